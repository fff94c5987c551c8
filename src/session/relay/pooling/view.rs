//! Transaction pooling: the client's own view of `pg_prepared_statements`, which replaces the
//! server's in its SQL: its statements under its names, created on the connection first.

use super::*;

impl Relay {
    /// What `pg_prepared_statements` becomes for this client: the server's view joined to the
    /// client's own statements, under the client's names (never another client's statements
    /// or pgtenant's own). SQL-prepared ones show their PREPARE statement as the client wrote
    /// it (PostgreSQL shows the whole query string that carried it).
    /// `own`: the statements the text being checked creates, which are in the view.
    pub(in crate::session::relay) fn prepared_view_sql(&self, own: &[OwnStatement]) -> String {
        let mut rows: Vec<String> = Vec::new();
        for s in own {
            rows.push(format!(
                "({}, {}, {})",
                quote_literal(&s.name),
                quote_literal(&s.server_name),
                s.shown.as_deref().map_or("NULL".into(), quote_literal)
            ));
        }
        for (name, statement) in &self.session.statements {
            if own.iter().any(|s| s.shown.is_none() && s.name == *name) {
                // Replaced by the statement being prepared.
                continue;
            }
            rows.push(format!(
                "({}, {}, NULL)",
                quote_literal(name),
                quote_literal(&statement.server_name)
            ));
        }
        for (server_name, prepared) in &self.session.sql_prepared {
            // The PREPARE as the client wrote it (the server's copy is pgtenant's text).
            let name = self.client_statement_name(server_name);
            rows.push(format!(
                "({}, {}, {})",
                quote_literal(name),
                quote_literal(server_name),
                quote_literal(&prepared.shown)
            ));
        }
        if rows.is_empty() {
            return "(SELECT NULL::pg_catalog.text AS name, NULL::pg_catalog.text AS statement, \
                    NULL::pg_catalog.timestamptz AS prepare_time, \
                    NULL::pg_catalog.regtype[] AS parameter_types, NULL::pg_catalog.bool AS from_sql, \
                    NULL::pg_catalog.int8 AS generic_plans, NULL::pg_catalog.int8 AS custom_plans \
                    WHERE false)"
                .into();
        }
        format!(
            "(SELECT m.name, COALESCE(m.shown, p.statement) AS statement, \
                  p.prepare_time, p.parameter_types, p.from_sql, p.generic_plans, p.custom_plans \
             FROM pg_catalog.pg_prepared_statements p \
             JOIN (VALUES {}) AS m(name, server_name, shown) ON p.name OPERATOR(pg_catalog.=) m.server_name)",
            rows.join(", ")
        )
    }

    /// The statements the SQL PREPAREs of `text` create, not already the client's: found by
    /// checking `text` with a placeholder view (a PREPARE's server name does not depend on
    /// the view). Their rows show the client's own PREPARE statement.
    pub(in crate::session::relay) fn sql_prepares(&mut self, text: &[u8]) -> Vec<OwnStatement> {
        self.rules.policy.prepared_view = Some(String::new());
        let probe = self.rules.policy.check(text, self.standard_conforming);
        self.rules.policy.prepared_view = None;
        let mut own: Vec<OwnStatement> = Vec::new();
        for e in probe.effects {
            if let Effect::Prepare {
                server_name, shown, ..
            } = e
                && !self.session.sql_prepared.contains_key(&server_name)
                && !own.iter().any(|s| s.server_name == server_name)
            {
                own.push(OwnStatement {
                    name: self.client_statement_name(&server_name).to_owned(),
                    shown: Some(shown),
                    server_name,
                });
            }
        }
        own
    }

    /// A server statement name for this client alone (`pgt_v<client>_<n>`).
    pub(in crate::session::relay) fn own_server_name(&mut self) -> String {
        self.session.own_names += 1;
        format!("pgt_v{}_{}", self.rules.client_id, self.session.own_names)
    }

    /// Creates every statement of the client's on this connection (for its view of
    /// `pg_prepared_statements`).
    pub(in crate::session::relay) fn create_all_statements(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
    ) {
        let names: Vec<String> = self.session.statements.keys().cloned().collect();
        for name in names {
            self.ensure_statement(name.as_bytes(), pooled, out, false, |_, _| {});
        }
        let missing: Vec<(String, String)> = self
            .session
            .sql_prepared
            .iter()
            .filter(|(server_name, _)| !pooled.prepared.contains(server_name))
            .map(|(n, p)| (n.clone(), p.sql.clone()))
            .collect();
        for (server_name, sql) in missing {
            self.inject_query(out, tracker, &sql);
            pooled.prepared.insert(&server_name);
        }
    }
}
