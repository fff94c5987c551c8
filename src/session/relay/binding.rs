//! Binding the tenant context at the start of every pooled transaction, in band (DESIGN.md
//! §5 S1, §6). A separate statement per transaction would cost the server a whole extra
//! implicit transaction. So when the transaction's first statement allows it, the binding
//! rides inside that statement's own transaction:
//!
//! - a simple Query gets the binding `SET` prepended to its text. The `SET`'s
//!   CommandComplete is consumed, and error positions are shifted back;
//! - an extended-protocol batch gets a Bind and Execute of pgtenant's own `set_config`
//!   statement ahead of the client's messages, before its Sync. Their replies are consumed.
//!
//! Statements that cannot run inside a transaction block (DISCARD ALL, VACUUM, CREATE
//! INDEX CONCURRENTLY, ...) or that PostgreSQL treats specially keep a separate binding
//! statement. If the client's transaction fails, the binding rolls back with it; the next
//! transaction binds again, so no statement ever runs unbound.

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

use super::Relay;
use super::pooling::Reply;
use crate::pool::cache::PooledState;
use crate::protocol::tracker::ConnTracker;
use crate::protocol::{encode, tag, take_cstr};

/// First keywords after which a statement may share the binding's transaction.
const IN_BAND_SAFE: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "with",
    "values",
    "table",
    "begin",
    "start",
    "set",
    "show",
    "declare",
    "fetch",
    "move",
    "prepare",
    "execute",
    "deallocate",
    "explain",
    "copy",
    "reset",
    "listen",
    "unlisten",
    "notify",
    "commit",
    "rollback",
    "end",
    "abort",
];

/// Replies of the in-band binding to consume at the start of a client epoch.
#[derive(Debug)]
pub(super) struct InBand {
    pub(super) epoch: u64,
    /// Message types still to consume, in order.
    pub(super) expect: &'static [u8],
    /// Bytes prepended to the client's query text (error positions move by this much).
    pub(super) shift: usize,
}

/// What the tenant binding needs.
#[derive(Debug, Clone, Default)]
pub struct Binding {
    /// `SET` statement(s) binding the context, as pgtenant's own constant text (the tenant's
    /// id and schema, never client text).
    pub sql: String,
    pub tenant_id: String,
    /// The schema tenant's `search_path` value, if bound.
    pub search_path: Option<String>,
    /// The shard verifies the context (it has a context key): every binding also sets the
    /// token kept in the connection's [`PooledState::context_token`], as a parameter.
    pub verified: bool,
    /// The Bind and Execute of an extended batch's binding as last encoded, with the
    /// statement and token they carry: the same for every transaction on a connection, so
    /// encoded once per connection the session meets (the buffers are reused: no
    /// allocation per transaction).
    pub encoded: Option<(&'static str, String, Vec<u8>)>,
}

impl Binding {
    pub(super) fn statement(&self) -> (&'static str, &'static str) {
        crate::own_sql::binding_statement(self.verified, self.search_path.is_some())
    }

    /// The parameters of [`Binding::statement`]. A verified binding without a token binds
    /// an empty one: the shard then shows no rows (fail closed).
    pub(super) fn values<'a>(&'a self, token: Option<&'a str>) -> impl Iterator<Item = &'a str> {
        std::iter::once(self.tenant_id.as_str())
            .chain(self.verified.then(|| token.unwrap_or("")))
            .chain(self.search_path.as_deref())
    }

    /// Appends the Bind and Execute of [`Binding::statement`] with the connection's `token`
    /// to `out`: the bytes of the last time when the token is the same. False when they
    /// cannot be encoded (nothing is appended then).
    pub(super) fn put_bind_execute(&mut self, token: Option<&str>, out: &mut BytesMut) -> bool {
        let key = if self.verified {
            token.unwrap_or("")
        } else {
            ""
        };
        let name = self.statement().0;
        if let Some((n, t, bytes)) = &self.encoded
            && *n == name
            && t == key
        {
            out.extend_from_slice(bytes);
            return true;
        }
        let mark = out.len();
        if !encode::bind_execute(name, self.values(Some(key)), out) {
            out.truncate(mark);
            return false;
        }
        let (n, t, bytes) = self.encoded.get_or_insert_with(Default::default);
        *n = name;
        t.clear();
        t.push_str(key);
        bytes.clear();
        bytes.extend_from_slice(&out[mark..]);
        true
    }

    /// The binding as `(setting, value)` pairs for pgtenant's own `set_config` statement.
    pub(super) fn pairs<'a>(&'a self, token: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
        let mut pairs = vec![(crate::tenant::TENANT_SETTING, self.tenant_id.as_str())];
        if self.verified {
            pairs.push((crate::tenant::context::CONTEXT_SETTING, token.unwrap_or("")));
        }
        if let Some(path) = &self.search_path {
            pairs.push(("search_path", path));
        }
        pairs
    }
}

/// Whether `text` starts with a keyword that may share a transaction with the binding.
pub(super) fn in_band_safe(text: &[u8]) -> bool {
    // Most statements start with SELECT at the first byte: one compare of six bytes at once
    // (the general path classifies each byte). Setting bit 5 of each byte folds an ASCII
    // capital to its small letter, and maps no byte but `S` and `s` to `s` (and so on), so
    // the compare is exactly a case-insensitive one of letters.
    if let Some(&[a, b, c, d, e, f, next]) = text.get(..7)
        && u64::from_le_bytes([a, b, c, d, e, f, 0, 0]) | 0x2020_2020_2020
            == u64::from_le_bytes(*b"select\0\0")
        && !next.is_ascii_alphabetic()
    {
        return true;
    }
    first_word_in_band_safe(text)
}

/// [`in_band_safe`] without its shortcut: the first word against the list.
fn first_word_in_band_safe(text: &[u8]) -> bool {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let rest = &text[start..];
    let len = rest
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    let word = &rest[..len];
    IN_BAND_SAFE
        .iter()
        .any(|k| k.as_bytes().eq_ignore_ascii_case(word))
}

/// How the binding goes with a transaction's first message.
pub(super) enum Plan {
    /// Prepended to the Query's text.
    Prefix,
    /// Bind and Execute of pgtenant's statement ahead of the extended batch.
    Extended,
    /// A separate statement before the message.
    Separate,
}

impl Relay {
    /// Decides, from the first message of a transaction, how its binding goes. It must run
    /// before anything else about the message is recorded, so the message's epoch is known.
    pub(super) fn binding_plan(&self, t: u8, body: &[u8]) -> Plan {
        let text: Option<&[u8]> = match t {
            tag::QUERY => Some(body.strip_suffix(&[0]).unwrap_or(body)),
            tag::PARSE => take_cstr(body)
                .and_then(|(_, rest)| take_cstr(rest))
                .map(|(text, _)| text),
            tag::BIND => take_cstr(body)
                .and_then(|(_, rest)| take_cstr(rest))
                .and_then(|(name, _)| self.statement_text(name)),
            _ => None,
        };
        match text.is_some_and(in_band_safe) {
            // The prefix carries only the tenant id (never a verified token: that is bound
            // with the connection's setup and after RESET/DISCARD, as a parameter, and stays
            // on the backend between transactions).
            true if t == tag::QUERY => Plan::Prefix,
            true => Plan::Extended,
            false => Plan::Separate,
        }
    }

    /// Appends pgtenant's Bind and Execute (and, once per connection, its Parse) for the
    /// extended batch about to start.
    pub(super) fn bind_extended(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
    ) {
        let epoch = self.next_epoch;
        let binding = &mut self.rules.binding;
        let (name, sql) = binding.statement();
        let created = !pooled.prepared.contains(name);
        // Written straight into `out`; taken back if it cannot be encoded.
        let mark = out.len();
        let encoded = (!created
            || frontend::parse(name, sql, std::iter::empty::<u32>(), out).is_ok())
            && binding.put_bind_execute(pooled.token_for(&binding.tenant_id), out);
        if !encoded {
            out.truncate(mark);
            self.inject_binding(out, tracker, pooled);
            return;
        }
        if created {
            // Cached like any statement: parsed once per connection.
            self.session
                .parses
                .push_back((epoch, Reply::Proxy, Some(name.to_owned())));
            pooled.prepared.insert(name);
            self.session.created.push((epoch, name.to_owned()));
            tracker.client_message(tag::PARSE);
        }
        tracker.client_message(tag::BIND);
        tracker.client_message(tag::EXECUTE);
        self.in_band = Some(InBand {
            epoch,
            expect: b"2DC",
            shift: 0,
        });
    }

    /// Writes to `q` the Query `text` (as it will be sent) with the binding in front of it.
    pub(super) fn bind_prefix(&mut self, text: &[u8], q: &mut BytesMut) {
        let binding = &self.rules.binding;
        let prefix = binding.sql.as_bytes();
        let text = text.strip_suffix(&[0]).unwrap_or(text);
        // Written in place: this runs for every pooled transaction that starts with a Query.
        let body_len = prefix.len() + 2 + text.len() + 1;
        q.reserve(5 + body_len);
        q.put_u8(tag::QUERY);
        q.put_u32(u32::try_from(body_len + 4).unwrap_or(u32::MAX));
        q.put_slice(prefix);
        q.put_slice(b"; ");
        q.put_slice(text);
        q.put_u8(0);
        self.in_band = Some(InBand {
            epoch: self.next_epoch,
            expect: if binding.search_path.is_some() {
                b"CC"
            } else {
                b"C"
            },
            shift: prefix.len() + 2,
        });
    }

    /// A separate binding statement before the message about to be sent.
    pub(super) fn bind_separately(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &PooledState,
    ) {
        if std::mem::take(&mut self.binding_due) {
            self.inject_binding(out, tracker, pooled);
        }
    }

    /// The binding as statements of pgtenant's own: constant text when the shard does not
    /// verify the context, parameters (the token among them) when it does.
    pub(super) fn inject_binding(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &PooledState,
    ) {
        // Lent out while pgtenant's statements are written (no copy of it per binding).
        let binding = std::mem::take(&mut self.rules.binding);
        if binding.verified {
            self.inject_set_configs(
                out,
                tracker,
                &binding.pairs(pooled.token_for(&binding.tenant_id)),
            );
        } else {
            self.inject_query(out, tracker, &binding.sql);
            self.last_is_binding();
        }
        self.rules.binding = binding;
    }

    /// Whether a server message starting now is an in-band binding reply to consume.
    pub(super) fn in_band_reply(&mut self, t: u8) -> bool {
        match &mut self.in_band {
            Some(ib) if ib.epoch == self.done_epoch && ib.expect.first() == Some(&t) => {
                ib.expect = &ib.expect[1..];
                true
            }
            _ => false,
        }
    }

    /// An ErrorResponse in the client's epoch: the binding failed if its replies were still
    /// due (the next transaction binds again), and positions in the client's text move back.
    pub(super) fn in_band_error(&mut self, body: &[u8]) -> Option<BytesMut> {
        let ib = self
            .in_band
            .as_mut()
            .filter(|ib| ib.epoch == self.done_epoch)?;
        if !ib.expect.is_empty() {
            ib.expect = &[];
            tracing::warn!(
                "binding the tenant context failed with the transaction's first statement"
            );
            return None;
        }
        if ib.shift == 0 {
            return None;
        }
        let shift = ib.shift;
        let mut fields = Vec::new();
        let mut rest = body;
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let (value, tail) = take_cstr(tail)?;
            let mut value = String::from_utf8_lossy(value).into_owned();
            if code == b'P' {
                match value.parse::<usize>() {
                    Ok(p) if p > shift => value = (p - shift).to_string(),
                    _ => {
                        rest = tail;
                        continue;
                    }
                }
            }
            fields.push((code, value));
            rest = tail;
        }
        let mut out = BytesMut::new();
        encode::error_response(fields, &mut out);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{Binding, first_word_in_band_safe, in_band_safe};
    use crate::protocol::encode;
    use bytes::BytesMut;

    /// What [`Binding::put_bind_execute`] must write: the Bind and Execute encoded afresh.
    fn fresh(b: &Binding, token: Option<&str>) -> BytesMut {
        let mut out = BytesMut::new();
        assert!(encode::bind_execute(
            b.statement().0,
            b.values(token),
            &mut out
        ));
        out
    }

    #[test]
    fn the_extended_binding_is_encoded_once_per_token_and_statement() {
        let mut b = Binding {
            sql: String::new(),
            tenant_id: "t1".into(),
            search_path: None,
            verified: true,
            encoded: None,
        };
        let put = |b: &mut Binding, token: Option<&str>| {
            // After bytes already in the buffer, as the client's batch would be.
            let mut out = BytesMut::from(&b"before"[..]);
            assert!(b.put_bind_execute(token, &mut out));
            assert!(out.starts_with(b"before"));
            out.split_off(6)
        };
        let first = put(&mut b, Some("tok1"));
        assert_eq!(first, fresh(&b, Some("tok1")));
        assert!(first.windows(4).any(|w| w == b"tok1"));
        // Again on the same connection: the same bytes, from the cache.
        assert_eq!(put(&mut b, Some("tok1")), first);
        // Another connection's token: encoded again, with that token.
        let second = put(&mut b, Some("tok2"));
        assert_eq!(second, fresh(&b, Some("tok2")));
        assert!(!second.windows(4).any(|w| w == b"tok1"));
        // No token (a verified binding without one binds an empty token: no rows).
        assert_eq!(put(&mut b, None), fresh(&b, None));
        // The shard no longer verifies: another statement, whatever the cache held.
        b.verified = false;
        let unverified = put(&mut b, Some("tok2"));
        assert_eq!(unverified, fresh(&b, None));
        assert!(unverified.windows(9).any(|w| w == b"pgt_bind1"));
        assert!(!unverified.windows(4).any(|w| w == b"tok2"));
    }

    #[test]
    fn the_select_shortcut_agrees_with_the_first_word_for_every_byte() {
        for at in 0..7 {
            for byte in 0..=255u8 {
                let mut text = *b"select 1";
                text[at] = byte;
                assert_eq!(
                    in_band_safe(&text),
                    first_word_in_band_safe(&text),
                    "{}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

    #[test]
    fn the_first_word_decides_with_or_without_the_select_shortcut() {
        for (text, safe) in [
            (&b"SELECT 1"[..], true),
            (b"select\n1", true),
            (b"SeLeCt(1)", true),
            (b"SELECT", true),
            (b"  select 1", true),
            (b"SELECTX 1", false),
            (b"selects 1", false),
            (b"SELEC 1", false),
            (b"", false),
            (b"update t set a = 1", true),
            (b"COPY t FROM STDIN", true),
            (b"DISCARD ALL", false),
            (b"VACUUM t", false),
            (b"CREATE INDEX CONCURRENTLY i ON t (a)", false),
            (b"\xffSELECT", false),
            (b"\x13ELECT 1", false),
            (b"SELEC\x14 1", false),
        ] {
            assert_eq!(
                in_band_safe(text),
                safe,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }
}
