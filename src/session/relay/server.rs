//! The server's messages on their way to the client: pgtenant's own replies consumed, errors
//! explained, notifications renamed, and each ReadyForQuery closing an epoch.

use super::*;

impl Relay {
    /// Moves everything forwardable from the server's `input` to `to_client`, updating the
    /// connection's tracker and parameters.
    pub fn server_bytes(
        &mut self,
        scanner: &mut FrameScanner,
        input: &mut BytesMut,
        to_client: &mut BytesMut,
        tracker: &mut ConnTracker,
        params: &mut BTreeMap<String, String>,
        pooled: &mut PooledState,
    ) -> Result<(), ServerProtocolError> {
        if self.unusable {
            return Err(ServerProtocolError::BindingFailed(
                "the binding could not be sent".into(),
            ));
        }
        let mut run = 0;
        while let Some(piece) = scanner.next(&input[run..])? {
            match piece {
                Piece::Pass { tag, len, .. } => {
                    if let Some(t) = tag {
                        tracker.server_message(t, None);
                        self.swallowing = self.own_front() || self.in_band_reply(t);
                    }
                    if self.swallowing {
                        drop_piece(input, &mut run, len, to_client);
                    } else {
                        run += len;
                    }
                }
                Piece::Whole { tag: t, len } => {
                    let body = &input[run + 5..run + len];
                    let proxy = self.own_front();
                    match t {
                        tag::READY_FOR_QUERY => {
                            let status = server_msgs::ready_for_query(body)
                                .map_err(|_| ServerProtocolError::Malformed("ReadyForQuery"))?;
                            tracker.server_message(t, Some(status));
                            let failed = std::mem::take(&mut self.epoch_failed);
                            self.end_epoch(failed, pooled, tracker);
                            if !self.session.notify_now.is_empty() {
                                // The client's own notifications come before its
                                // ReadyForQuery, as from PostgreSQL.
                                move_run(input, run, to_client);
                                run = 0;
                                let pid = self.virtual_pid;
                                self.own_notifications(pid, to_client);
                            }
                            if proxy {
                                drop_piece(input, &mut run, len, to_client);
                            } else {
                                run += len;
                            }
                        }
                        tag::PARAMETER_STATUS => {
                            let (k, v) = server_msgs::parameter_status(body)
                                .map_err(|_| ServerProtocolError::Malformed("ParameterStatus"))?;
                            if k == "standard_conforming_strings" {
                                self.standard_conforming = v == "on";
                            }
                            params.insert(k.to_owned(), v.to_owned());
                            run += len;
                        }
                        tag::ERROR_RESPONSE if self.owners.front() == Some(&Owner::Bind) => {
                            tracker.server_message(t, None);
                            let fields = server_msgs::error_fields(body).unwrap_or_default();
                            self.unusable = true;
                            // What the client's own statements produced still reaches it.
                            move_run(input, run, to_client);
                            return Err(ServerProtocolError::BindingFailed(format!(
                                "{}: {}",
                                fields.code, fields.message
                            )));
                        }
                        tag::ERROR_RESPONSE if proxy => {
                            let skipped = tracker.server_message(t, None);
                            let fields = server_msgs::error_fields(body).unwrap_or_default();
                            tracing::warn!(code = %fields.code, message = %fields.message,
                                "rebinding the tenant context failed; retrying after the next statement");
                            self.rebind_at_sync = true;
                            drop_piece(input, &mut run, len, to_client);
                            self.skip_epochs(skipped, pooled, tracker);
                        }
                        tag::ERROR_RESPONSE => {
                            let skipped = tracker.server_message(t, None);
                            self.epoch_failed = true;
                            if server_msgs::error_fields(body)
                                .is_ok_and(|f| f.severity == "FATAL" || f.severity == "PANIC")
                            {
                                // The server closes after this: the connection never goes back.
                                self.server_fatal = true;
                            }
                            let epoch = self.done_epoch;
                            let shifted = self.in_band_error(body);
                            match self.refusals.iter().position(|(e, _)| *e == epoch) {
                                Some(i) => {
                                    let mine = self.refusals.remove(i).map(|(_, e)| e);
                                    let mut out = BytesMut::new();
                                    if let Some(e) = mine {
                                        e.encode(&mut out);
                                    }
                                    replace_piece(input, &mut run, len, to_client, &out);
                                }
                                None => match shifted {
                                    Some(out) => {
                                        replace_piece(input, &mut run, len, to_client, &out)
                                    }
                                    None => run += len,
                                },
                            }
                            self.skip_epochs(skipped, pooled, tracker);
                        }
                        tag::NOTIFICATION_RESPONSE
                            if self.rules.policy.prepared_prefix.is_some() =>
                        {
                            // Pooled connections do not listen; the tenant's hub delivers.
                            drop_piece(input, &mut run, len, to_client);
                        }
                        tag::NOTIFICATION_RESPONSE => {
                            let out = self.rename_notification(body);
                            replace_piece(input, &mut run, len, to_client, &out);
                        }
                        tag::PARSE_COMPLETE | tag::CLOSE_COMPLETE => {
                            tracker.server_message(t, None);
                            match self.reply_for(t) {
                                _ if proxy => drop_piece(input, &mut run, len, to_client),
                                Some(shown) if shown == t => run += len,
                                Some(shown) => {
                                    let mut out = BytesMut::new();
                                    encode::raw(shown, b"", &mut out);
                                    replace_piece(input, &mut run, len, to_client, &out);
                                }
                                None => drop_piece(input, &mut run, len, to_client),
                            }
                        }
                        other => {
                            tracker.server_message(other, None);
                            if proxy {
                                drop_piece(input, &mut run, len, to_client);
                            } else {
                                run += len;
                            }
                        }
                    }
                }
            }
        }
        move_run(input, run, to_client);
        if self.busy_since.is_some() && self.owners.is_empty() && !tracker.busy() {
            // Extended messages without a Sync completed: idle, maybe in a transaction.
            self.busy_since = None;
            self.ready_since = Instant::now();
        }
        Ok(())
    }

    /// The epoch being answered is over: its ReadyForQuery arrived, or the server skipped it
    /// (an extended message before its Query failed).
    pub(super) fn end_epoch(
        &mut self,
        failed: bool,
        pooled: &mut PooledState,
        tracker: &ConnTracker,
    ) {
        let owner = self.owners.pop_front();
        if self
            .in_band
            .as_ref()
            .is_some_and(|ib| ib.epoch <= self.done_epoch)
        {
            self.in_band = None;
        }
        if self.rules.policy.prepared_prefix.is_some() {
            self.close_epoch(self.done_epoch, failed, tracker.status(), pooled);
        }
        self.done_epoch += 1;
        let now = Instant::now();
        if owner == Some(Owner::Client) {
            self.count_epoch(now, tracker.status());
        }
        if self.owners.is_empty() && !tracker.busy() {
            self.busy_since = None;
            self.ready_since = now;
        } else {
            self.busy_since = Some(now);
        }
        if !self.refusals.is_empty() {
            let done = self.done_epoch;
            self.refusals.retain(|(e, _)| *e >= done);
        }
    }

    /// A client's epoch ended at `now` with the transaction status `status`: its duration
    /// and what it counted go to the tenant's metrics.
    pub(super) fn count_epoch(&mut self, now: Instant, status: TxStatus) {
        let stats = &self.rules.tenant.stats;
        if let Some(since) = self.busy_since {
            stats
                .query_seconds
                .record(now.saturating_duration_since(since));
        }
        if status == TxStatus::Idle {
            TenantStats::add(&stats.transactions, 1);
        }
        let (c, f) = (self.counters, &mut self.flushed);
        TenantStats::add(&stats.queries, c.queries - f.queries);
        TenantStats::add(&stats.guard_refusals, c.refused - f.refused);
        TenantStats::add(&stats.throttled, c.throttled - f.throttled);
        *f = c;
    }

    /// Ends the epochs of Queries the server skips after a failed extended message: their
    /// ReadyForQuery never comes (the next one is the Sync's).
    pub(super) fn skip_epochs(
        &mut self,
        skipped: u32,
        pooled: &mut PooledState,
        tracker: &ConnTracker,
    ) {
        for _ in 0..skipped {
            self.epoch_failed = false;
            self.end_epoch(true, pooled, tracker);
        }
    }

    /// Strips the tenant's prefix from a notification's channel; notifications from outside
    /// the namespace are dropped (empty result).
    pub(super) fn rename_notification(&self, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        let Some((pid, rest)) = body.split_first_chunk::<4>() else {
            return out;
        };
        let Some((channel, payload)) = take_cstr(rest) else {
            return out;
        };
        // The client's own NOTIFY shows the pid its BackendKeyData gave it.
        let pid = match i32::from_be_bytes(*pid) {
            pid if Some(pid) == self.own_backend => self.virtual_pid,
            pid => pid,
        };
        let own = match &self.rules.notify_prefix {
            None => channel,
            Some(prefix) => match channel.strip_prefix(prefix.as_bytes()) {
                Some(own) => own,
                None => return out,
            },
        };
        let mut b = Vec::with_capacity(body.len());
        b.put_i32(pid);
        b.put_slice(own);
        b.put_u8(0);
        b.put_slice(payload);
        encode::raw(tag::NOTIFICATION_RESPONSE, &b, &mut out);
        out
    }
}
