//! Transaction pooling: the session state a client's statements change (settings, prepared
//! statements, LISTEN, advisory locks), recorded when their transaction commits and replayed
//! on the next server connection.

use super::*;

impl Relay {
    /// Before a client Query with session effects is sent: statements it needs are created
    /// first, stale ones of the same name dropped.
    pub(in crate::session::relay) fn before_query(
        &mut self,
        effects: &[Effect],
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
    ) {
        if std::mem::take(&mut self.session.resync) {
            self.inject_query(out, tracker, "DEALLOCATE ALL");
            pooled.prepared.clear();
        }
        for effect in effects {
            match effect {
                // A stale statement of an earlier client session, not this one's: drop it.
                Effect::Prepare { server_name, .. }
                    if pooled.prepared.contains(server_name)
                        && !self.session.sql_prepared.contains_key(server_name) =>
                {
                    self.inject_query(
                        out,
                        tracker,
                        &format!("DEALLOCATE {}", quote_ident(server_name)),
                    );
                    pooled.prepared.remove(server_name);
                }
                // Statements the session has must exist here: EXECUTE and DEALLOCATE find
                // them, and preparing one again fails as it would on PostgreSQL.
                Effect::Prepare { server_name, .. }
                | Effect::Execute(server_name)
                | Effect::Deallocate(server_name)
                    if !pooled.prepared.contains(server_name) =>
                {
                    if let Some(sql) = self
                        .session
                        .sql_prepared
                        .get(server_name)
                        .map(|p| p.sql.clone())
                    {
                        self.inject_query(out, tracker, &sql);
                        pooled.prepared.insert(server_name);
                    } else if let Effect::Deallocate(_) = effect
                        && let Some(statement) = self.protocol_statement(server_name)
                    {
                        // SQL DEALLOCATE of a statement the client prepared with Parse (as
                        // psycopg's cache does): create it under the name the DEALLOCATE
                        // uses, so that it succeeds as on PostgreSQL.
                        let definition = statement.definition.clone();
                        let epoch = self.next_epoch;
                        encode_parse(server_name, &definition, out);
                        self.session.parses.push_back((epoch, Reply::Proxy, None));
                        tracker.client_message(tag::PARSE);
                        encode::raw(tag::SYNC, b"", out);
                        self.open_epoch(super::super::Owner::Proxy, tracker, tag::SYNC);
                    }
                }
                // Statements prepared after this in the same pipeline must survive it, so the
                // maps are cleared now, in message order, not when the reply arrives.
                Effect::DiscardAll | Effect::DeallocateAll => {
                    self.session.statements.clear();
                    self.session.statement_bytes = 0;
                    self.session.sql_prepared.clear();
                    pooled.prepared.clear();
                    self.session.cleared.push(self.next_epoch);
                    if matches!(effect, Effect::DiscardAll) {
                        self.forget_channels();
                    }
                }
                Effect::PreparedView => self.create_all_statements(out, tracker, pooled),
                Effect::Listen(channel) => {
                    if self.session.channels.insert(channel.clone()) {
                        self.rules.tenant.count_channels(1, true);
                    }
                    self.listens.push(channel.clone());
                }
                Effect::Unlisten(channel) => {
                    if self.session.channels.remove(channel) {
                        self.rules.tenant.count_channels(1, false);
                    }
                    self.unlistens.push(Some(channel.clone()));
                }
                Effect::UnlistenAll => self.forget_channels(),
                _ => {}
            }
        }
    }

    /// The client no longer listens on anything.
    pub(in crate::session::relay) fn forget_channels(&mut self) {
        let n = self.session.channels.len();
        self.session.channels.clear();
        self.rules.tenant.count_channels(n, false);
        self.unlistens.push(None);
    }

    /// After the Query is sent: its effects wait for the epoch's outcome; a LISTEN is undone
    /// on the pooled connection at once (notifications come through the tenant's hub). A
    /// statement that leaves session state on the server pins the connection from now on.
    pub(in crate::session::relay) fn after_query(
        &mut self,
        epoch: u64,
        effects: Vec<Effect>,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
    ) {
        if self.session.pinned.is_none()
            && let Some(reason) = effects.iter().find_map(|e| match e {
                Effect::Pin(r) => Some(*r),
                _ => None,
            })
        {
            tracing::info!(
                client = self.rules.client_id,
                reason,
                "server connection pinned to its client until it leaves or runs DISCARD ALL"
            );
            self.audit_pin(reason);
            self.rules
                .tenant
                .stats
                .pinned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.session.pinned = Some(reason);
        }
        let listened: Vec<String> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Listen(c) => Some(crate::own_sql::unlisten(c)),
                _ => None,
            })
            .collect();
        if !listened.is_empty() {
            self.inject_query(out, tracker, &listened.join("; "));
        }
        self.session.effects.push_back((epoch, effects));
    }

    /// At the ReadyForQuery closing `epoch` (`status`: the transaction status it reported):
    /// apply its effects if it succeeded, undo its statement creations the server never
    /// confirmed if it failed, and drop replies that will never come. Setting changes made
    /// in a transaction block wait for its end and are dropped if it rolls back.
    pub(in crate::session::relay) fn close_epoch(
        &mut self,
        epoch: u64,
        failed: bool,
        status: TxStatus,
        pooled: &mut PooledState,
    ) {
        self.session.parses.retain(|(e, _, _)| *e > epoch);
        self.session.closes.retain(|(e, _)| *e > epoch);
        let created: Vec<String> = self
            .session
            .created
            .iter()
            .filter(|(e, _)| *e <= epoch)
            .map(|(_, n)| n.clone())
            .collect();
        self.session.created.retain(|(e, _)| *e > epoch);
        if failed {
            for name in created {
                pooled.prepared.remove(&name);
            }
            if self.session.cleared.contains(&epoch) {
                self.session.resync = true;
            }
        }
        self.session.cleared.retain(|e| *e > epoch);
        while let Some(&(e, generation)) = self.session.unnamed_unconfirmed.front()
            && e <= epoch
        {
            // Never confirmed: the Parse failed (or was skipped), and PostgreSQL dropped the
            // previous unnamed statement when it began.
            self.session.unnamed_unconfirmed.pop_front();
            if self
                .session
                .unnamed
                .as_ref()
                .is_some_and(|(_, g)| *g >= generation)
            {
                self.session.unnamed = None;
            }
        }
        while self
            .session
            .effects
            .front()
            .is_some_and(|(e, _)| *e <= epoch)
        {
            let Some((e, effects)) = self.session.effects.pop_front() else {
                break;
            };
            let epoch_failed = failed && e == epoch;
            for effect in effects {
                self.transaction_effect(effect, epoch_failed, pooled);
            }
        }
        let s = &mut self.session;
        match status {
            TxStatus::Idle => {
                // The transaction is over: committed unless it failed or was rolled back.
                let staged = std::mem::take(&mut s.staged);
                let committed = !std::mem::take(&mut s.tx_failed) && !failed;
                s.savepoints.clear();
                if committed {
                    for effect in staged {
                        self.commit_effect(effect, pooled);
                    }
                }
            }
            TxStatus::Failed => s.tx_failed = true,
            TxStatus::InTransaction => {}
        }
    }

    /// One effect of an epoch that ended (`failed`: with an error, so only its savepoints
    /// count: the server kept those it made before the error).
    pub(in crate::session::relay) fn transaction_effect(
        &mut self,
        effect: Effect,
        failed: bool,
        pooled: &mut PooledState,
    ) {
        let s = &mut self.session;
        match effect {
            Effect::Savepoint(name) => s.savepoints.push((name, s.staged.len())),
            _ if failed => {}
            Effect::Set { .. }
            | Effect::Reset(_)
            | Effect::ResetAll
            | Effect::DiscardAll
            | Effect::Notify { .. } => s.staged.push(effect),
            Effect::Rollback => {
                s.staged.clear();
                s.savepoints.clear();
                s.tx_failed = false;
            }
            Effect::RollbackTo(name) => {
                if let Some(i) = s.savepoints.iter().rposition(|(n, _)| *n == name) {
                    s.staged.truncate(s.savepoints[i].1);
                    s.savepoints.truncate(i + 1);
                }
                s.tx_failed = false;
            }
            Effect::Release(name) => {
                if let Some(i) = s.savepoints.iter().rposition(|(n, _)| *n == name) {
                    s.savepoints.truncate(i);
                }
            }
            Effect::CommitChain => {
                s.savepoints.clear();
                for effect in std::mem::take(&mut s.staged) {
                    self.commit_effect(effect, pooled);
                }
            }
            other => self.apply_effect(other, pooled),
        }
    }

    /// An effect of a transaction that committed: a NOTIFY on a channel the client listens
    /// on is shown to it before the ReadyForQuery (once per channel and payload, as
    /// PostgreSQL folds duplicates within a transaction); the rest is applied.
    pub(in crate::session::relay) fn commit_effect(
        &mut self,
        effect: Effect,
        pooled: &mut PooledState,
    ) {
        match effect {
            Effect::Notify { channel, payload } => {
                let s = &mut self.session;
                let note = (channel, payload);
                if !s.committed_notes.contains(&note) && s.committed_notes.len() < 64 {
                    s.committed_notes.push(note.clone());
                }
                if s.channels.contains(&note.0) && !s.notify_now.contains(&note) {
                    s.notify_now.push(note);
                }
            }
            other => self.apply_effect(other, pooled),
        }
    }

    /// Shows the notifications the client's committed transaction sent itself, before the
    /// ReadyForQuery about to be forwarded; their copies from the hub will be skipped.
    pub(in crate::session::relay) fn own_notifications(
        &mut self,
        virtual_pid: i32,
        to_client: &mut BytesMut,
    ) {
        let prefix = self.rules.notify_prefix.clone().unwrap_or_default();
        for (channel, payload) in std::mem::take(&mut self.session.notify_now) {
            let shown = channel.strip_prefix(&prefix).unwrap_or(&channel);
            encode::notification(virtual_pid, shown, &payload, to_client);
            if self.session.local_sent.len() >= 1024 {
                self.session.local_sent.pop_front();
            }
            self.session.local_sent.push_back((channel, payload));
        }
    }

    /// The notifications the client's transactions committed since last asked.
    pub fn take_committed_notes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.session.committed_notes)
    }

    /// Whether the hub's notification `channel`/`payload` is the copy of one the client was
    /// shown already (its own, before its ReadyForQuery). Matched by channel and payload
    /// only, once per own notification: the pid the hub credits can be another client's when
    /// the hub reads the notification before the client's commit is recorded (seen once in
    /// CI under load), and skipping by count keeps the client from seeing its own twice.
    pub fn shown_already(&mut self, channel: &str, payload: &str) -> bool {
        let s = &mut self.session;
        match s
            .local_sent
            .iter()
            .position(|(c, p)| c == channel && p == payload)
        {
            Some(i) => {
                s.local_sent.remove(i);
                true
            }
            None => false,
        }
    }

    pub(in crate::session::relay) fn apply_effect(
        &mut self,
        effect: Effect,
        pooled: &mut PooledState,
    ) {
        let s = &mut self.session;
        let mut settings_changed = false;
        match effect {
            Effect::Set { key, pairs } => {
                s.settings.retain(|(k, _)| *k != key);
                s.settings.push((key, pairs));
                settings_changed = true;
            }
            Effect::Reset(key) => {
                s.settings.retain(|(k, _)| *k != key);
                settings_changed = true;
            }
            Effect::ResetAll => {
                s.settings.clear();
                settings_changed = true;
            }
            Effect::DiscardAll => {
                s.settings.clear();
                settings_changed = true;
                if let Some(reason) = s.pinned.take() {
                    self.rules
                        .tenant
                        .stats
                        .pinned
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        client = self.rules.client_id,
                        reason,
                        "DISCARD ALL: server connection unpinned"
                    );
                }
            }
            Effect::Prepare {
                server_name,
                sql,
                shown,
            } => {
                pooled.prepared.insert(&server_name);
                let prepared = SqlPrepared { sql, shown };
                s.statement_bytes += prepared.bytes();
                if let Some(old) = s.sql_prepared.insert(server_name, prepared) {
                    s.statement_bytes -= old.bytes();
                }
            }
            Effect::Deallocate(server_name) => {
                pooled.prepared.remove(&server_name);
                if let Some(old) = s.sql_prepared.remove(&server_name) {
                    s.statement_bytes -= old.bytes();
                } else {
                    // A statement prepared with Parse, deallocated with SQL.
                    let client_name = self
                        .rules
                        .policy
                        .prepared_prefix
                        .as_deref()
                        .and_then(|p| server_name.strip_prefix(p))
                        .unwrap_or_default();
                    if let Some(old) = s.statements.remove(client_name) {
                        s.statement_bytes -= old.definition.len();
                    }
                }
            }
            Effect::DeallocateAll
            | Effect::Execute(_)
            | Effect::Listen(_)
            | Effect::Unlisten(_)
            | Effect::UnlistenAll
            | Effect::Rollback
            | Effect::CommitChain
            | Effect::Savepoint(_)
            | Effect::RollbackTo(_)
            | Effect::Release(_)
            | Effect::PreparedView
            | Effect::Notify { .. }
            | Effect::Pin(_) => {}
        }
        if settings_changed {
            s.key = None;
            // The connection that ran the change has it applied already.
            pooled.settings_of = Some(self.settings_key());
        }
    }
}
