//! Transaction pooling: the client's prepared statements (named and unnamed) renamed into
//! pgtenant's names and re-created on whichever server connection the client holds.

use super::*;
use crate::error::{ClientError, sqlstate};

/// What [`Relay::ensure_statement`] found for a statement name.
pub(in crate::session::relay) enum Ensured {
    /// Written into the output.
    Done,
    /// The client has no statement of that name: nothing written.
    Unknown,
    /// The statement has effects and only a plain one was asked for: nothing written.
    HasEffects,
}

impl Relay {
    /// The query text of the client's statement `name`, if it prepared one.
    pub(in crate::session::relay) fn statement_text(&self, name: &[u8]) -> Option<&[u8]> {
        let statement = self
            .session
            .statements
            .get(String::from_utf8_lossy(name).as_ref())?;
        take_cstr(&statement.definition).map(|(text, _)| text)
    }

    /// Transaction pooling: a Parse, Bind, Describe or Close, renamed into pgtenant's
    /// statement names. Returns the bytes to send instead, if any (possibly preceded by a
    /// Parse creating the statement on this connection).
    pub(in crate::session::relay) fn pooled_message(
        &mut self,
        t: u8,
        body: &[u8],
        pooled: &mut PooledState,
        effects: Vec<Effect>,
    ) -> Option<BytesMut> {
        if !self.pooled() {
            return None;
        }
        let epoch = self.next_epoch;
        match t {
            tag::PARSE => {
                let (name, definition) = take_cstr(body)?;
                if name.is_empty() {
                    self.session.parses.push_back((epoch, Reply::Client, None));
                    self.session.unnamed_effects = effects;
                    let s = &mut self.session;
                    s.unnamed_generation += 1;
                    // The previous unnamed statement's buffer holds the new text.
                    let mut text = s.unnamed.take().map(|(t, _)| t).unwrap_or_default();
                    text.clear();
                    text.extend_from_slice(definition);
                    s.unnamed = Some((text, s.unnamed_generation));
                    s.unnamed_unconfirmed
                        .push_back((epoch, s.unnamed_generation));
                    s.unnamed_dropped = false;
                    pooled.unnamed = Some((self.rules.client_id, s.unnamed_generation));
                    return None;
                }
                let name = String::from_utf8_lossy(name).into_owned();
                let server_name = self
                    .session
                    .next_server_name
                    .take()
                    .unwrap_or_else(|| server_statement_name(definition));
                self.session.statement_bytes += definition.len();
                let replaced = self.session.statements.insert(
                    name,
                    Statement {
                        server_name: server_name.clone(),
                        definition: definition.to_vec(),
                        effects,
                    },
                );
                if let Some(old) = replaced {
                    self.session.statement_bytes -= old.definition.len();
                }
                let mut out = self.out_buf();
                if pooled.prepared.contains(&server_name) {
                    encode::message(tag::CLOSE, &mut out, |b| {
                        b.put_u8(b'S');
                        b.extend_from_slice(NO_STATEMENT);
                    });
                    self.session.closes.push_back((epoch, Reply::AsParse));
                } else {
                    encode_parse(&server_name, definition, &mut out);
                    self.session.parses.push_back((
                        epoch,
                        Reply::Client,
                        Some(server_name.clone()),
                    ));
                    pooled.prepared.insert(&server_name);
                    self.session.created.push((epoch, server_name));
                }
                Some(out)
            }
            tag::BIND => {
                let (portal, rest) = take_cstr(body)?;
                let (name, params) = take_cstr(rest)?;
                let prefix = &body[..portal.len() + 1];
                let bind = |server_name: &str, out: &mut BytesMut| {
                    encode::message(tag::BIND, out, |b| {
                        b.extend_from_slice(portal);
                        b.put_u8(0);
                        b.extend_from_slice(server_name.as_bytes());
                        b.put_u8(0);
                        b.extend_from_slice(params);
                    });
                };
                let effects = if name.is_empty() {
                    self.session.unnamed_effects.clone()
                } else {
                    // The common case, a statement without effects: one lookup.
                    let mut out = self.out_buf();
                    match self.ensure_statement(name, pooled, &mut out, true, bind) {
                        Ensured::Done => return Some(out),
                        Ensured::Unknown => {
                            self.recycle(out);
                            self.refuse_unknown_statement(name);
                            return Some(replace_statement_name(t, prefix, params));
                        }
                        Ensured::HasEffects => {
                            self.recycle(out);
                            self.session
                                .statements
                                .get(String::from_utf8_lossy(name).as_ref())
                                .map_or_else(Vec::new, |s| s.effects.clone())
                        }
                    }
                };
                if !effects.is_empty() {
                    // Each Bind runs the statement's effects again: bounded as a Query's are
                    // (a statement prepared once and run 10,000 times in a transaction).
                    if let Err(why) = self.queue_effects(effects) {
                        return Some(self.refuse_bind(
                            ClientError::error(sqlstate::CONFIGURATION_LIMIT_EXCEEDED, why),
                            prefix,
                            params,
                        ));
                    }
                }
                if name.is_empty() {
                    return self.unnamed_message(t, body, pooled, prefix, params);
                }
                let mut out = self.out_buf();
                match self.ensure_statement(name, pooled, &mut out, false, bind) {
                    Ensured::Unknown => None,
                    Ensured::Done | Ensured::HasEffects => Some(out),
                }
            }
            tag::DESCRIBE | tag::CLOSE => {
                let (&kind, rest) = body.split_first()?;
                if t == tag::CLOSE {
                    self.session.closes.push_back((epoch, Reply::Client));
                }
                if kind != b'S' {
                    return None;
                }
                let (name, _) = take_cstr(rest)?;
                if name.is_empty() {
                    if t == tag::CLOSE {
                        // Closing the unnamed statement: the client has none any more.
                        self.session.unnamed = None;
                        pooled.unnamed = None;
                        return None;
                    }
                    let after = rest.get(name.len()..).unwrap_or_default();
                    return self.unnamed_message(t, body, pooled, b"S", after);
                }
                if t == tag::CLOSE {
                    // The server statement stays in the connection's cache for others.
                    if let Some(old) = self
                        .session
                        .statements
                        .remove(String::from_utf8_lossy(name).as_ref())
                    {
                        self.session.statement_bytes -= old.definition.len();
                    }
                    let mut out = self.out_buf();
                    encode::message(tag::CLOSE, &mut out, |b| {
                        b.put_u8(b'S');
                        b.extend_from_slice(NO_STATEMENT);
                    });
                    return Some(out);
                }
                let mut out = self.out_buf();
                let describe = |server_name: &str, out: &mut BytesMut| {
                    encode::message(tag::DESCRIBE, out, |b| {
                        b.put_u8(b'S');
                        b.extend_from_slice(server_name.as_bytes());
                        b.put_u8(0);
                    });
                };
                match self.ensure_statement(name, pooled, &mut out, false, describe) {
                    Ensured::Done | Ensured::HasEffects => Some(out),
                    Ensured::Unknown => {
                        self.recycle(out);
                        self.refuse_unknown_statement(name);
                        Some(replace_statement_name(
                            t,
                            b"S",
                            rest.get(name.len()..).unwrap_or_default(),
                        ))
                    }
                }
            }
            _ => None,
        }
    }

    /// A Bind or Describe (`t`, `body`) of the unnamed statement. When the client has one
    /// and this connection holds another (or none), a Parse re-creating it goes first (its
    /// reply consumed). When the client has none and the connection holds another client's,
    /// the message is replaced (`prefix`, `rest`: see [`replace_statement_name`]) and
    /// answered as PostgreSQL does.
    pub(in crate::session::relay) fn unnamed_message(
        &mut self,
        t: u8,
        body: &[u8],
        pooled: &mut PooledState,
        prefix: &[u8],
        rest: &[u8],
    ) -> Option<BytesMut> {
        let me = self.rules.client_id;
        self.settle_unnamed(pooled);
        let generation = match &self.session.unnamed {
            // The connection holds it already: the message goes as it is.
            Some((_, generation)) if pooled.unnamed == Some((me, *generation)) => return None,
            Some((_, generation)) => *generation,
            // No unnamed statement of the client's: the server may answer for its own only
            // when the connection holds no other client's.
            None if pooled.unnamed.is_none_or(|(client, _)| client == me) => return None,
            None => return self.no_unnamed(t, prefix, rest),
        };
        // The client's unnamed statement is re-created on this connection ahead of the message.
        let mut out = self.out_buf();
        if let Some((definition, _)) = &self.session.unnamed {
            encode_parse("", definition, &mut out);
        }
        self.session
            .parses
            .push_back((self.next_epoch, Reply::Proxy, None));
        pooled.unnamed = Some((me, generation));
        encode::raw(t, body, &mut out);
        Some(out)
    }

    /// The client's Bind or Describe of an unnamed statement it does not have, on a
    /// connection holding another client's: answered as PostgreSQL does, never reaching it.
    pub(in crate::session::relay) fn no_unnamed(
        &mut self,
        t: u8,
        prefix: &[u8],
        rest: &[u8],
    ) -> Option<BytesMut> {
        self.counters.refused += 1;
        self.refuse(
            self.next_epoch,
            crate::error::ClientError::error(
                crate::error::sqlstate::INVALID_SQL_STATEMENT_NAME,
                "unnamed prepared statement does not exist",
            ),
        );
        Some(replace_statement_name(t, prefix, rest))
    }

    /// The client's Parse-prepared statement that SQL names `server_name` (its name in the
    /// client's SQL namespace).
    pub(super) fn protocol_statement(&self, server_name: &str) -> Option<&Statement> {
        let prefix = self.rules.policy.prepared_prefix.as_deref()?;
        self.session
            .statements
            .get(server_name.strip_prefix(prefix)?)
    }

    /// A simple Query reached the connection: PostgreSQL drops the unnamed statement.
    pub(in crate::session::relay) fn query_sent(
        &mut self,
        pooled: &mut PooledState,
        by_client: bool,
    ) {
        if by_client {
            self.session.unnamed = None;
        }
        pooled.unnamed = None;
    }

    /// Transaction pooling: the refusal for a Parse of `name` with `definition` (after the
    /// name) that would take the client's statements past their bounds.
    pub(in crate::session::relay) fn statement_over_limit(
        &self,
        name: &[u8],
        definition: &[u8],
    ) -> Option<String> {
        if !self.pooled() || name.is_empty() {
            return None;
        }
        let s = &self.session;
        let existing = s.statements.get(String::from_utf8_lossy(name).as_ref());
        let freed = existing.map_or(0, |old| old.definition.len());
        if existing.is_none() && s.statements.len() >= MAX_STATEMENTS {
            return Some(format!(
                "this session holds {MAX_STATEMENTS} prepared statements, the limit through pgtenant; close some first"
            ));
        }
        if s.statement_bytes - freed + definition.len() > MAX_STATEMENT_BYTES {
            return Some(format!(
                "this session's prepared statements would exceed {} MiB of text, the limit through pgtenant; close some first",
                MAX_STATEMENT_BYTES >> 20
            ));
        }
        None
    }

    /// Queues what a Bind's run of a statement changes, with what this batch's earlier Binds
    /// queued; `Err` (and nothing queued) when together they would pass the session's bounds.
    pub(in crate::session::relay) fn queue_effects(
        &mut self,
        effects: Vec<Effect>,
    ) -> Result<(), String> {
        let mut pending = std::mem::take(&mut self.session.pending_effects);
        let before = pending.len();
        pending.extend(effects);
        let over = self.effects_over_limit(&pending);
        if over.is_some() {
            pending.truncate(before);
        }
        self.session.pending_effects = pending;
        over.map_or(Ok(()), Err)
    }

    /// Transaction pooling: the refusal for a Query whose effects would take the client's
    /// SQL prepared statements or recorded settings past their bounds. No effects (most
    /// statements) is answered inline: every bound below counts effects, except the text
    /// budget, which is looked at as the full check would.
    #[inline(always)]
    pub(in crate::session::relay) fn effects_over_limit(
        &self,
        effects: &[Effect],
    ) -> Option<String> {
        if effects.is_empty() && self.session.statement_bytes <= MAX_STATEMENT_BYTES {
            return None;
        }
        self.effects_over_bounds(effects)
    }

    /// [`Relay::effects_over_limit`] with effects to count.
    fn effects_over_bounds(&self, effects: &[Effect]) -> Option<String> {
        if !self.pooled() {
            return None;
        }
        let s = &self.session;
        let (mut prepares, mut bytes) = (0, 0);
        for e in effects {
            if let Effect::Prepare {
                server_name,
                sql,
                shown,
            } = e
                && !s.sql_prepared.contains_key(server_name)
            {
                prepares += 1;
                bytes += sql.len() + shown.len();
            }
        }
        if prepares > 0 && s.sql_prepared.len() + prepares > MAX_SQL_PREPARED {
            return Some(format!(
                "this session holds {MAX_SQL_PREPARED} SQL prepared statements, the limit through pgtenant; DEALLOCATE some first"
            ));
        }
        // One budget for both kinds: what pgtenant keeps to create them again elsewhere.
        if s.statement_bytes + bytes > MAX_STATEMENT_BYTES {
            return Some(format!(
                "this session's prepared statements would exceed {} MiB of text, the limit through pgtenant; DEALLOCATE some first",
                MAX_STATEMENT_BYTES >> 20
            ));
        }
        let channels = effects
            .iter()
            .filter(|e| matches!(e, Effect::Listen(c) if !s.channels.contains(c)))
            .count();
        if channels > 0 && s.channels.len() + channels > MAX_CHANNELS {
            return Some(format!(
                "this session listens on {MAX_CHANNELS} channels, the limit through pgtenant; UNLISTEN some first"
            ));
        }
        if channels > 0 && self.rules.tenant.channels() + channels > MAX_TENANT_CHANNELS {
            return Some(format!(
                "this tenant's sessions listen on {MAX_TENANT_CHANNELS} channels together, the limit through pgtenant; UNLISTEN some first"
            ));
        }
        let settings = effects
            .iter()
            .filter(|e| matches!(e, Effect::Set { key, .. } if !s.settings.iter().any(|(k, _)| k == key)))
            .count();
        if settings > 0 && s.settings.len() + settings > MAX_SETTINGS {
            return Some(format!(
                "this session has set {MAX_SETTINGS} settings, the limit through pgtenant"
            ));
        }
        // Bytes, not only counts: names and values come from the client.
        let new: Vec<(&str, usize)> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Set { key, pairs } => Some((key.as_str(), setting_bytes(key, pairs))),
                _ => None,
            })
            .collect();
        if !new.is_empty() {
            let new_bytes: usize = new.iter().map(|(_, b)| b).sum();
            let kept: usize = s
                .settings
                .iter()
                .filter(|(k, _)| !new.iter().any(|(key, _)| key == k))
                .map(|(k, pairs)| setting_bytes(k, pairs))
                .sum();
            if kept + new_bytes > MAX_SETTING_BYTES {
                return Some(format!(
                    "this session's settings would exceed {} KiB of names and values, the limit through pgtenant; RESET some first",
                    MAX_SETTING_BYTES >> 10
                ));
            }
        }
        let (mut staging, mut staging_bytes) = (0, 0);
        for b in effects.iter().filter_map(staged_bytes) {
            staging += 1;
            staging_bytes += b;
        }
        if staging > 0 {
            let held: usize = s.staged.iter().filter_map(staged_bytes).sum::<usize>()
                + s.savepoints.iter().map(|(n, _)| n.len()).sum::<usize>();
            if s.staged.len() + s.savepoints.len() + staging > MAX_STAGED
                || held + staging_bytes > MAX_STAGED_BYTES
            {
                return Some(format!(
                    "this transaction holds {MAX_STAGED} changes (settings, notifications, savepoints) or {} MiB of them, the limit through pgtenant; end it first",
                    MAX_STAGED_BYTES >> 20
                ));
            }
        }
        None
    }

    /// `name` is a statement the client never prepared: the message is answered with
    /// PostgreSQL's 26000, and never reaches a statement of pgtenant's or of another client.
    pub(in crate::session::relay) fn refuse_unknown_statement(&mut self, name: &[u8]) {
        self.counters.refused += 1;
        let shown = String::from_utf8_lossy(name).into_owned();
        self.refuse(
            self.next_epoch,
            crate::error::ClientError::error(
                crate::error::sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{shown}\" does not exist"),
            ),
        );
    }

    /// Transaction pooling: the client name of an `EXECUTE` in `effects` that names no
    /// statement the client prepared (earlier, or in the same text before it).
    pub(in crate::session::relay) fn unknown_execute(&self, effects: &[Effect]) -> Option<String> {
        if !self.pooled() {
            return None;
        }
        let mut prepared_here = Vec::new();
        for effect in effects {
            match effect {
                Effect::Prepare { server_name, .. } => prepared_here.push(server_name.as_str()),
                Effect::Execute(server_name)
                    if !self.session.sql_prepared.contains_key(server_name)
                        && !prepared_here.contains(&server_name.as_str()) =>
                {
                    return Some(self.client_statement_name(server_name).to_owned());
                }
                _ => {}
            }
        }
        None
    }

    /// Writes the client's statement `name` into `out` through `then` (given its server
    /// name), creating it on this connection first when needed. Names the client never
    /// prepared are `Unknown` (nothing written); with `plain_only`, a statement with effects
    /// is `HasEffects` (nothing written: they are queued first). One lookup.
    pub(in crate::session::relay) fn ensure_statement(
        &mut self,
        name: &[u8],
        pooled: &mut PooledState,
        out: &mut BytesMut,
        plain_only: bool,
        then: impl FnOnce(&str, &mut BytesMut),
    ) -> Ensured {
        if name.is_empty() {
            return Ensured::Unknown;
        }
        let epoch = self.next_epoch;
        let session = &mut self.session;
        let Some(statement) = session
            .statements
            .get(String::from_utf8_lossy(name).as_ref())
        else {
            return Ensured::Unknown;
        };
        if plain_only && !statement.effects.is_empty() {
            return Ensured::HasEffects;
        }
        if !pooled.prepared.contains(&statement.server_name) {
            encode_parse(&statement.server_name, &statement.definition, out);
            session
                .parses
                .push_back((epoch, Reply::Proxy, Some(statement.server_name.clone())));
            pooled.prepared.insert(&statement.server_name);
            session.created.push((epoch, statement.server_name.clone()));
        }
        then(&statement.server_name, out);
        Ensured::Done
    }
}
