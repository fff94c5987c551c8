//! The client's messages on their way to the server: framed, checked by the guard, renamed
//! for transaction pooling, with pgtenant's binding and own statements put in front.

use super::*;

impl Relay {
    /// Moves everything forwardable from `input` to `to_server`. `pooled` is the server
    /// connection's transaction-pooling state.
    pub fn client_bytes(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
    ) -> Result<ClientStep, FrameError> {
        let mut run = 0;
        loop {
            let piece = match self.client_scan.next(&input[run..])? {
                None => break,
                Some(p) => p,
            };
            let (t, len) = match piece {
                Piece::Pass { tag, len, .. } => {
                    if let Some(t) = tag {
                        if self.binding_due {
                            move_run(input, run, to_server);
                            run = 0;
                            self.bind_separately(to_server, tracker, pooled);
                        }
                        tracker.client_message(t);
                    }
                    run += len;
                    continue;
                }
                Piece::Whole { tag, len } => (tag, len),
            };
            let message = &input[run..run + len];
            let body = &message[5..];
            let mut effects = Vec::new();
            let mut before = self.out_buf();
            let mut prefix = false;
            if self.binding_due && t != tag::TERMINATE {
                match self.binding_plan(t, body) {
                    binding::Plan::Prefix => prefix = true,
                    binding::Plan::Extended => {
                        self.binding_due = false;
                        self.bind_extended(&mut before, tracker, pooled);
                    }
                    binding::Plan::Separate => self.bind_separately(&mut before, tracker, pooled),
                }
            }
            let replacement: Option<(u8, BytesMut)> = match t {
                tag::TERMINATE => {
                    move_run(input, run, to_server);
                    input.advance(len);
                    return Ok(ClientStep::Terminate);
                }
                tag::QUERY => {
                    self.bound_checks.unnamed_gone();
                    if self.pooled() {
                        self.query_sent(pooled, true);
                    }
                    let (replacement, found) = self.on_query(body);
                    effects = found;
                    if !effects.is_empty() || self.session.resync {
                        self.before_query(&effects, &mut before, tracker, pooled);
                    }
                    replacement
                }
                tag::PARSE => match self.on_parse(body) {
                    ParseOutcome::Refused(bytes) => {
                        // The stand-in is an unnamed Parse: the server's unnamed statement
                        // goes (and the client's too, when its Parse was unnamed).
                        if self.pooled() {
                            self.query_sent(pooled, body.first() == Some(&0));
                        }
                        Some((tag::PARSE, bytes))
                    }
                    ParseOutcome::Forward(new_body, found) => {
                        // What the statement needs on this connection goes ahead of it;
                        // its effects count when a Bind executes it.
                        if !found.is_empty() || self.session.resync {
                            self.before_query(&found, &mut before, tracker, pooled);
                        }
                        let body = new_body.as_deref().unwrap_or(body);
                        match self.pooled_message(tag::PARSE, body, pooled, found) {
                            Some(bytes) => Some((tag::PARSE, bytes)),
                            None => new_body.map(|b| {
                                let mut out = BytesMut::new();
                                encode::raw(tag::PARSE, &b, &mut out);
                                (tag::PARSE, out)
                            }),
                        }
                    }
                },
                tag::BIND | tag::DESCRIBE | tag::CLOSE => {
                    let refused = match t {
                        tag::BIND => self.check_bind(body),
                        tag::CLOSE => {
                            if let Some((b'S', rest)) = body.split_first()
                                && let Some((name, _)) = take_cstr(rest)
                            {
                                self.bound_checks.closed(name);
                            }
                            None
                        }
                        _ => None,
                    };
                    if let Some(bytes) = refused {
                        Some((t, bytes))
                    } else if self.pooled() {
                        self.pooled_message(t, body, pooled, Vec::new())
                            .map(|bytes| (t, bytes))
                    } else {
                        self.own_statement_names(t, body)
                    }
                }
                tag::EXECUTE => self.on_execute(body),
                tag::FUNCTION_CALL if self.rules.policy.scope == Scope::Tenant => {
                    self.counters.refused += 1;
                    self.refuse(
                        self.next_epoch,
                        ClientError::error(
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                            "the FunctionCall (fast-path) message is not allowed through pgtenant",
                        ),
                    );
                    let mut out = BytesMut::new();
                    encode::raw(tag::QUERY, REFUSED_SQL, &mut out);
                    Some((tag::QUERY, out))
                }
                // Dedicated placements allow the fast path; it runs SQL, so it counts
                // against the query rate like Query and Execute.
                tag::FUNCTION_CALL => {
                    self.counters.queries += 1;
                    if self.take_query_token() {
                        None
                    } else {
                        let error = self.throttled();
                        self.refuse(self.next_epoch, error);
                        Some((tag::QUERY, refused_query()))
                    }
                }
                _ => None,
            };
            // A refused statement needs no binding; the next one gets it.
            let refused = self
                .refusals
                .back()
                .is_some_and(|(e, _)| *e == self.next_epoch);
            let prefixed = prefix && !refused;
            let sent_tag = if prefixed {
                self.binding_due = false;
                tag::QUERY
            } else {
                replacement.as_ref().map(|(t, _)| *t).unwrap_or(t)
            };
            if replacement.is_none() && before.is_empty() && !prefixed {
                run += len;
            } else {
                move_run(input, run, to_server);
                to_server.extend_from_slice(&before);
                let sent: &[u8] = match &replacement {
                    Some((_, bytes)) => bytes,
                    None => &input[..len],
                };
                if prefixed {
                    // Written straight into the output: no copy of the query per transaction.
                    self.bind_prefix(sent.get(5..).unwrap_or_default(), to_server);
                } else {
                    to_server.extend_from_slice(sent);
                }
                input.advance(len);
                run = 0;
            }
            self.recycle(before);
            if let Some((_, bytes)) = replacement {
                self.recycle(bytes);
            }
            if sent_tag == tag::SYNC {
                // The effects of the statements this batch executed.
                effects = std::mem::take(&mut self.session.pending_effects);
            }
            match sent_tag {
                // Discarded by the server (an extended message failed, no Sync yet): no
                // ReadyForQuery comes for it and nothing it would change happens.
                tag::QUERY | tag::FUNCTION_CALL if tracker.skipping() => {
                    tracker.client_message(sent_tag);
                }
                tag::QUERY | tag::SYNC | tag::FUNCTION_CALL => {
                    let epoch = self.next_epoch;
                    self.open_epoch(Owner::Client, tracker, sent_tag);
                    let mut after = self.out_buf();
                    if !effects.is_empty() {
                        self.after_query(epoch, effects, &mut after, tracker);
                    }
                    if std::mem::take(&mut self.rebind_at_sync) {
                        self.inject_rebind(&mut after, tracker, pooled);
                    }
                    if !after.is_empty() {
                        move_run(input, run, to_server);
                        run = 0;
                        to_server.extend_from_slice(&after);
                    }
                    self.recycle(after);
                }
                other => tracker.client_message(other),
            }
        }
        move_run(input, run, to_server);
        if self.pooled() {
            self.settle_unnamed(pooled);
        }
        if self.busy_since.is_none() && tracker.busy() {
            // Extended messages (Execute and Flush, no Sync) keep the server busy too.
            self.busy_since = Some(self.now());
        }
        Ok(ClientStep::Continue)
    }

    /// Checks a Query; returns the message to send instead, if any, and its session effects
    /// (transaction pooling).
    pub(super) fn on_query(&mut self, body: &[u8]) -> (Option<(u8, BytesMut)>, Vec<Effect>) {
        self.counters.queries += 1;
        let epoch = self.next_epoch;
        if !self.take_query_token() {
            let error = self.throttled();
            self.refuse(epoch, error);
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        let text = cstr_prefix(body);
        let mut verdict = self.check_text(text);
        if verdict.refusal.is_none()
            && let Some(refused) = self.execute_of_bound(text)
        {
            verdict = refused;
        }
        if let Some(r) = verdict.refusal {
            self.counters.refused += 1;
            self.refuse(
                epoch,
                ClientError::error(r.sqlstate, r.message).with_position(r.position),
            );
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        if let Some(why) = self.effects_over_limit(&verdict.effects) {
            self.counters.refused += 1;
            self.refuse(
                epoch,
                ClientError::error(sqlstate::CONFIGURATION_LIMIT_EXCEEDED, why),
            );
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        if let Some(name) = self.unknown_execute(&verdict.effects) {
            self.counters.refused += 1;
            self.refuse(
                epoch,
                ClientError::error(
                    sqlstate::INVALID_SQL_STATEMENT_NAME,
                    format!("prepared statement \"{name}\" does not exist"),
                ),
            );
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        // The rebind goes right after this Query (the epoch opens when it is sent).
        self.rebind_at_sync |= verdict.rebind;
        let replacement = verdict.rewritten.map(|sql| {
            let mut out = BytesMut::new();
            let mut b = sql.into_bytes();
            b.push(0);
            encode::raw(tag::QUERY, &b, &mut out);
            (tag::QUERY, out)
        });
        (replacement, verdict.effects)
    }

    /// Checks a Parse. A refused one becomes an unnamed Parse the server fails on; an
    /// allowed one may come back with rewritten text (same name and parameter types).
    pub(super) fn on_parse(&mut self, body: &[u8]) -> ParseOutcome {
        // A malformed Parse goes through unchanged: the server rejects it.
        let Some((name, rest)) = take_cstr(body) else {
            return ParseOutcome::Forward(None, Vec::new());
        };
        let Some((text, params)) = take_cstr(rest) else {
            return ParseOutcome::Forward(None, Vec::new());
        };
        if name.is_empty() {
            self.bound_checks.unnamed_gone();
        }
        let mut verdict = self.check_text_naming(text, name);
        if verdict.refusal.is_none()
            && let Some(why) = self
                .statement_over_limit(name, rest)
                .or_else(|| self.effects_over_limit(&verdict.effects))
        {
            verdict = crate::tenant::guard::Verdict::refuse_as(
                sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                why,
            );
        }
        if self.rules.policy.prepared_prefix.is_none()
            && crate::tenant::guard::is_reserved_name(name)
            && !self.rules.policy.unchecked
        {
            verdict = crate::tenant::guard::Verdict::refuse(
                "statement names starting with pgt_ or pgtenant_ are reserved by pgtenant",
            );
        }
        if verdict.refusal.is_none()
            && let Some(refused) = self.execute_of_bound(text)
        {
            verdict = refused;
        }
        if verdict.refusal.is_none() && !verdict.bound_settings.is_empty() {
            let calls = std::mem::take(&mut verdict.bound_settings);
            if let Err(refused) = self.keep_bound_settings(name, params, calls) {
                verdict = refused;
            }
        }
        if let Some(r) = verdict.refusal {
            self.session.next_server_name = None;
            self.counters.refused += 1;
            self.refuse(
                self.next_epoch,
                ClientError::error(r.sqlstate, r.message).with_position(r.position),
            );
            let mut b = vec![0];
            b.extend_from_slice(REFUSED_SQL);
            b.extend_from_slice(params);
            let mut out = BytesMut::new();
            encode::raw(tag::PARSE, &b, &mut out);
            if self.rules.policy.prepared_prefix.is_some() {
                self.session
                    .parses
                    .push_back((self.next_epoch, pooling::Reply::Client, None));
            }
            return ParseOutcome::Refused(out);
        }
        self.rebind_at_sync |= verdict.rebind;
        let rewritten = verdict.rewritten.map(|text| {
            let mut b = Vec::with_capacity(name.len() + text.len() + params.len() + 2);
            b.extend_from_slice(name);
            b.push(0);
            b.extend_from_slice(text.as_bytes());
            b.push(0);
            b.extend_from_slice(params);
            b
        });
        ParseOutcome::Forward(rewritten, verdict.effects)
    }

    /// Session mode: Bind, Describe or Close of one of pgtenant's own statement names is
    /// answered as PostgreSQL answers an unknown name; the server never sees the name.
    pub(super) fn own_statement_names(&mut self, t: u8, body: &[u8]) -> Option<(u8, BytesMut)> {
        let (prefix, name, rest) = match t {
            tag::BIND => {
                let (portal, rest) = take_cstr(body)?;
                let (name, rest) = take_cstr(rest)?;
                (&body[..portal.len() + 1], name, rest)
            }
            _ => {
                let (&kind, rest) = body.split_first()?;
                if kind != b'S' {
                    return None;
                }
                let (name, rest) = take_cstr(rest)?;
                (&body[..1], name, rest)
            }
        };
        if self.rules.policy.unchecked || !crate::tenant::guard::is_reserved_name(name) {
            return None;
        }
        if t != tag::CLOSE {
            self.counters.refused += 1;
            self.refuse(
                self.next_epoch,
                ClientError::error(
                    sqlstate::INVALID_SQL_STATEMENT_NAME,
                    format!(
                        "prepared statement \"{}\" does not exist",
                        String::from_utf8_lossy(name)
                    ),
                ),
            );
        }
        Some((t, replace_statement_name(t, prefix, rest)))
    }

    /// The guard's verdict on `text`; in transaction pooling a text naming
    /// `pg_prepared_statements` is checked again with the client's own view of it.
    pub(super) fn check_text(&mut self, text: &[u8]) -> crate::tenant::guard::Verdict {
        self.check_text_naming(text, b"")
    }

    /// Like [`Relay::check_text`], for the text of a Parse creating the client's statement
    /// `name`: a named statement that reads `pg_prepared_statements` sees itself there, as
    /// on PostgreSQL, so it gets a server name of its own, known before its text is written.
    pub(super) fn check_text_naming(
        &mut self,
        text: &[u8],
        name: &[u8],
    ) -> crate::tenant::guard::Verdict {
        let verdict = self.rules.policy.check_remembering(
            text,
            self.standard_conforming,
            &mut self.tokens,
            &mut self.passed,
        );
        if !verdict.wants_prepared_view {
            return verdict;
        }
        // The statements this text creates, which see themselves in the view.
        let mut own = Vec::new();
        if self.pooled() && !name.is_empty() {
            let server_name = self.own_server_name();
            own.push(OwnStatement {
                name: String::from_utf8_lossy(name).into_owned(),
                server_name,
                shown: None,
            });
        } else if self.pooled() {
            own = self.sql_prepares(text);
        }
        self.rules.policy.prepared_view = Some(self.prepared_view_sql(&own));
        self.session.next_server_name = if name.is_empty() {
            None
        } else {
            own.pop().map(|s| s.server_name)
        };
        let mut verdict = self.rules.policy.check(text, self.standard_conforming);
        self.rules.policy.prepared_view = None;
        if verdict.wants_prepared_view {
            // Cannot happen (the view was given); never forward the text unrewritten.
            return crate::tenant::guard::Verdict::refuse(
                "pg_prepared_statements could not be rewritten",
            );
        }
        if verdict.refusal.is_none() {
            verdict.effects.push(Effect::PreparedView);
        }
        verdict
    }

    /// Counts an Execute against the query rate.
    pub(super) fn on_execute(&mut self, body: &[u8]) -> Option<(u8, BytesMut)> {
        self.counters.queries += 1;
        if self.take_query_token() {
            return None;
        }
        let error = self.throttled();
        self.refuse(self.next_epoch, error);
        let max_rows = take_cstr(body)
            .map(|(_, rest)| rest)
            .unwrap_or(&[0, 0, 0, 0]);
        let mut b = Vec::with_capacity(REFUSED_PORTAL.len() + 4);
        b.extend_from_slice(REFUSED_PORTAL);
        b.extend_from_slice(max_rows);
        let mut out = BytesMut::new();
        encode::raw(tag::EXECUTE, &b, &mut out);
        Some((tag::EXECUTE, out))
    }

    pub(super) fn take_query_token(&mut self) -> bool {
        // Without a rate, no clock reading.
        self.rules.queries_per_second.is_none()
            || self
                .rules
                .tenant
                .take_query(self.rules.queries_per_second, Instant::now())
    }

    pub(super) fn throttled(&mut self) -> ClientError {
        self.counters.throttled += 1;
        ClientError::error(
            sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
            format!(
                "this tenant is over its limit of {} queries per second",
                self.rules.queries_per_second.unwrap_or_default()
            ),
        )
        .with_hint("slow down and retry")
    }
}
