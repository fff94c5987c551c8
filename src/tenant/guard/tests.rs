//! Guard cases: every spelling family of the constructs the guard refuses, and the harmless
//! statements real applications send, which must pass.

use std::time::Duration;

use super::*;

fn shared() -> Policy {
    Policy {
        scope: Scope::Tenant,
        protect_search_path: false,
        readonly: false,
        max_statement_timeout: Some(Duration::from_secs(30)),
        notify_prefix: Some("acme.".into()),
        allow_ddl: false,
        prepared_prefix: None,
        lock_salt: Some(0x8000_0000_0000_0001),
        unchecked: false,
        prepared_view: None,
    }
}

fn schema() -> Policy {
    Policy {
        protect_search_path: true,
        ..shared()
    }
}

fn readonly() -> Policy {
    Policy {
        readonly: true,
        ..shared()
    }
}

fn dedicated() -> Policy {
    Policy {
        scope: Scope::Dedicated,
        notify_prefix: None,
        ..shared()
    }
}

fn ddl() -> Policy {
    Policy {
        allow_ddl: true,
        prepared_prefix: None,
        ..schema()
    }
}

fn assert_allowed(p: &Policy, cases: &[&str]) {
    for sql in cases {
        let v = p.check(sql.as_bytes(), true);
        assert!(v.refusal.is_none(), "refused but should pass: {sql}\n{v:?}");
    }
}

fn assert_refused(p: &Policy, cases: &[&str]) {
    for sql in cases {
        let v = p.check(sql.as_bytes(), true);
        let r = v
            .refusal
            .unwrap_or_else(|| panic!("passed but should be refused: {sql}"));
        assert_eq!(r.sqlstate, "42501", "{sql}");
        assert!(!r.message.is_empty());
    }
}

#[test]
fn statements_real_applications_send_pass() {
    assert_allowed(
        &shared(),
        &[
            "SELECT 1",
            "select * from items where id = $1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            "INSERT INTO items (name) VALUES ('set_config')",
            "INSERT INTO items (name) VALUES ($1) RETURNING id",
            "UPDATE items SET name = 'x' WHERE id = 1",
            "DELETE FROM items WHERE id = 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "WITH d AS (DELETE FROM items RETURNING *) SELECT count(*) FROM d",
            "VALUES (1), (2)",
            "TABLE items",
            "(SELECT 1) UNION (SELECT 2)",
            "MERGE INTO items t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "INSERT INTO items (name) VALUES ('x') ON CONFLICT DO NOTHING",
            "BEGIN",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "START TRANSACTION READ ONLY",
            "COMMIT",
            "ROLLBACK",
            "END",
            "ABORT",
            "SAVEPOINT s1",
            "RELEASE SAVEPOINT s1",
            "ROLLBACK TO SAVEPOINT s1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM items",
            "FETCH 10 FROM c",
            "MOVE NEXT IN c",
            "CLOSE c",
            "CLOSE ALL",
            "SHOW search_path",
            "SHOW ALL",
            "CALL my_proc(1)",
            "SELECT current_setting('app.current_tenant_id')",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_sleep(0.1)",
            "select 'a'';set_config', $$ pg_terminate_backend $$",
            "select \"weird col\" from t",
            "SELECT 1; SELECT 2;",
            "",
            ";",
            "  -- just a comment",
            "/* c */ SELECT 1",
            "SELECT E'\\x41'",
            "SELECT U&'\\0041'",
            "SELECT B'101', X'ff'",
            "SELECT 1::int, '{1}'::int[]",
            "SELECT j->>'set_config' FROM docs j",
            "SELECT lo, logged, lot FROM t",
            "SELECT count(*) FILTER (WHERE x > 0) OVER w FROM t WINDOW w AS ()",
            "SELECT * FROM items FOR UPDATE SKIP LOCKED",
            "SELECT nextval('items_id_seq')",
            "SELECT $1::text AS \"pg_catalog\"",
        ],
    );
}

#[test]
fn harmless_settings_pass() {
    assert_allowed(
        &shared(),
        &[
            "SET application_name = 'x'",
            "SET SESSION work_mem TO '64MB'",
            "SET LOCAL lock_timeout = '1s'",
            "SET TIME ZONE 'UTC'",
            "SET timezone TO 'Europe/Paris'",
            "SET NAMES 'UTF8'",
            "SET client_encoding = 'LATIN1'",
            // asyncpg's startup value, quotes included; PostgreSQL strips them.
            "SET client_encoding = '''utf-8'''",
            "SET client_encoding = 'Utf-8'",
            "SET datestyle = ISO, MDY",
            "SET extra_float_digits = 3",
            "SET enable_seqscan = off",
            "SET random_page_cost = 1.1",
            "SET statement_timeout = 5000",
            "SET statement_timeout = '10s'",
            "SET statement_timeout TO DEFAULT",
            "SET myapp.user_id = '42'",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "SET CONSTRAINTS ALL DEFERRED",
            "SET search_path = myschema, public",
            "SET standard_conforming_strings = on",
            "SET client_min_messages TO warning",
            "SET XML OPTION DOCUMENT",
            "SET jit = off",
            "RESET application_name",
            "RESET work_mem",
            "RESET statement_timeout",
            "RESET TIME ZONE",
            "DISCARD PLANS",
            "DISCARD TEMP",
            "DISCARD SEQUENCES",
            "SELECT set_config('myapp.user_id', '42', false)",
            "SELECT set_config('statement_timeout', '5s', true)",
        ],
    );
}

#[test]
fn prepared_statements_explain_copy_and_temp_tables_pass() {
    assert_allowed(
        &shared(),
        &[
            "DEALLOCATE ALL",
            "DEALLOCATE PREPARE s1",
            "PREPARE p (int) AS SELECT $1",
            "EXECUTE p(1)",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE SELECT * FROM items",
            "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
            "EXPLAIN ANALYZE VERBOSE INSERT INTO items(name) VALUES ('x')",
            "COPY items (name) FROM STDIN",
            "COPY items TO STDOUT",
            "COPY (SELECT * FROM items) TO STDOUT WITH (FORMAT csv)",
            "CREATE TEMP TABLE t (x int)",
            "CREATE TEMPORARY TABLE t AS SELECT 1",
            "CREATE LOCAL TEMP TABLE t (x int) ON COMMIT DROP",
            "DROP TABLE IF EXISTS t",
            "UNLISTEN *",
        ],
    );
}

#[test]
fn reset_all_and_discard_all_rebind() {
    for sql in [
        "RESET ALL",
        "DISCARD ALL",
        "SELECT 1; DISCARD ALL",
        "reset  all;",
    ] {
        let v = shared().check(sql.as_bytes(), true);
        assert!(v.refusal.is_none() && v.rebind, "{sql}: {v:?}");
    }
    assert!(!shared().check(b"DISCARD PLANS", true).rebind);
}

#[test]
fn channels_move_into_the_tenants_namespace() {
    let cases = [
        ("LISTEN events", "LISTEN \"acme.events\""),
        ("listen \"Mixed\"", "listen \"acme.Mixed\""),
        ("UNLISTEN events", "UNLISTEN \"acme.events\""),
        ("NOTIFY events, 'hi'", "NOTIFY \"acme.events\", 'hi'"),
        (
            "SELECT pg_notify('events', 'x')",
            "SELECT pg_notify('acme.events', 'x')",
        ),
        ("LISTEN a; LISTEN b", "LISTEN \"acme.a\"; LISTEN \"acme.b\""),
    ];
    for (sql, want) in cases {
        let v = shared().check(sql.as_bytes(), true);
        assert!(v.refusal.is_none(), "{sql}: {v:?}");
        assert_eq!(v.rewritten.as_deref(), Some(want), "{sql}");
    }
    assert!(shared().check(b"SELECT 1", true).rewritten.is_none());
    assert_refused(
        &shared(),
        &[
            &format!("LISTEN {}", "x".repeat(60)),
            "SELECT pg_notify(chan, 'x') FROM t",
            "SELECT pg_notify($1, $2)",
        ],
    );
}

#[test]
fn tenant_context_cannot_be_set_in_any_spelling() {
    assert_refused(
        &shared(),
        &[
            "SET app.current_tenant_id = '8d2e4f60-3b1c-4a7d-8e9f-0a1b2c3d4e02'",
            "set APP.CURRENT_TENANT_ID to 'x'",
            "SET \"app\".\"current_tenant_id\" = 'x'",
            "SET \"app.current_tenant_id\" = 'x'",
            "SET \"APP.CURRENT_TENANT_ID\" TO 'x'",
            "SET SESSION app.current_tenant_id = 'x'",
            "SET LOCAL app.current_tenant_id = 'x'",
            "SET app . current_tenant_id = 'x'",
            "SET/**/app.current_tenant_id='x'",
            "SET app.current_tenant_id = DEFAULT",
            "SET U&\"app.current\\005ftenant_id\" = 'x'",
            "SET U&\"app.current!005ftenant_id\" UESCAPE '!' = 'x'",
            "SELECT 1; SET app.current_tenant_id = 'x'",
            "BEGIN; SET LOCAL app.current_tenant_id = 'x'; SELECT * FROM items; COMMIT",
            "RESET app.current_tenant_id",
            "reset \"app\".current_tenant_id",
            "PREPARE p AS SET app.current_tenant_id = 'x'",
            "EXPLAIN ANALYZE SET app.current_tenant_id = 'x'",
        ],
    );
}

#[test]
fn set_config_cannot_reach_protected_settings() {
    assert_refused(
        &shared(),
        &[
            "SELECT set_config('app.current_tenant_id', 'x', false)",
            "select pg_catalog.set_config('app.current_tenant_id','x',false)",
            "SELECT \"set_config\"('app.current_tenant_id', 'x', false)",
            "SELECT SET_CONFIG('APP.CURRENT_TENANT_ID', 'x', false)",
            "PREPARE p AS SELECT set_config($1, $2, false)",
            "SELECT set_config($1, $2, false), $1::char(40)",
            "SELECT $1::char(40), set_config($1, $2, false)",
            "SELECT set_config($1, 'x', false); SELECT 1",
            "EXPLAIN ANALYZE SELECT set_config($1, $2, false)",
            "SELECT set_config(($1), 'x', false)",
            "SELECT set_config($1::bpchar, 'x', false)",
            "SELECT set_config($1 || '', 'x', false)",
            "SELECT set_config('app.current_tenant_id', $1, false)",
            "SELECT set_config('app.current_tenant_id', 'x')",
            "SELECT set_config('app.' || 'current_tenant_id', 'x', false)",
            "SELECT set_config(E'app.current_tenant_id', 'x', false)",
            "SELECT set_config(E'app.current\\137tenant_id', 'x', false)",
            "SELECT set_config(U&'app.current\\005ftenant_id', 'x', false)",
            "SELECT set_config($$app.current_tenant_id$$, 'x', false)",
            "SELECT set_config /* c */ ('app.current_tenant_id', 'x', false)",
            "SELECT (set_config)('x', 'y', false)",
            "SELECT U&\"set\\005fconfig\"('app.current_tenant_id', 'x', false)",
            "SELECT set_config('role', 'postgres', false)",
            "SELECT set_config('session_authorization', 'postgres', false)",
            "SELECT set_config('statement_timeout', '0', false)",
            "SELECT set_config(name, 'x', false) FROM settings",
            "SELECT 1 AS set_config",
            "WITH s AS (SELECT set_config('app.current_tenant_id', 'x', true)) SELECT * FROM items, s",
            "DECLARE c CURSOR FOR SELECT set_config('app.current_tenant_id','x',false)",
            "COPY (SELECT set_config('app.current_tenant_id','x',false)) TO STDOUT",
            "PREPARE p AS SELECT set_config('app.current_tenant_id', $1, false)",
            "SELECT 1set_config('app.current_tenant_id', 'x', false)",
        ],
    );
}

#[test]
fn code_execution_and_object_creation_are_refused() {
    assert_refused(
        &shared(),
        &[
            "DO $$ BEGIN PERFORM 1; END $$",
            "do 'begin null; end'",
            "DO LANGUAGE plpgsql $$ BEGIN END $$",
            "SELECT 1; DO $$ $$",
            "SELECT 1/**/; DO 'x'",
            "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
            "CREATE OR REPLACE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
            "create procedure p() language sql as $$ select 1 $$",
            "CREATE VIEW v AS SELECT 1",
            "CREATE OR REPLACE VIEW v AS SELECT 1",
            "CREATE TEMP VIEW v AS SELECT 1",
            "CREATE RULE r AS ON INSERT TO items DO INSTEAD NOTHING",
            "CREATE TRIGGER t BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION f()",
            "CREATE TABLE t (x int)",
            "CREATE UNLOGGED TABLE t (x int)",
            "CREATE EXTENSION dblink",
            "CREATE SCHEMA s",
            "CREATE INDEX i ON items (name)",
            "CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)",
            "CREATE OPERATOR === (leftarg = int, rightarg = int, function = int4eq)",
            "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()",
            "CREATE POLICY p ON items USING (true)",
            "EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
            "PREPARE p AS DO $$ $$",
        ],
    );
}

#[test]
fn role_changes_and_administration_are_refused() {
    assert_refused(
        &shared(),
        &[
            "SET ROLE postgres",
            "SET LOCAL ROLE x",
            "SET SESSION ROLE x",
            "SET role = 'x'",
            "SET \"role\" = 'x'",
            "SET SESSION AUTHORIZATION postgres",
            "SET SESSION AUTHORIZATION DEFAULT",
            "RESET ROLE",
            "RESET SESSION AUTHORIZATION",
            "ALTER ROLE pgtenant_app BYPASSRLS",
            "ALTER USER pgtenant_app SUPERUSER",
            "ALTER SYSTEM SET work_mem = '1GB'",
            "ALTER DATABASE app SET app.current_tenant_id = 'x'",
            "ALTER TABLE items DISABLE ROW LEVEL SECURITY",
            "ALTER POLICY tenant_isolation ON items USING (true)",
            "GRANT ALL ON items TO public",
            "REVOKE SELECT ON items FROM pgtenant_app",
            "DROP POLICY tenant_isolation ON items",
            "DROP FUNCTION f",
            "DROP VIEW v",
            "DROP ROLE x",
            "SET session_replication_role = replica",
        ],
    );
}

#[test]
fn denied_functions_are_refused_as_identifiers() {
    assert_refused(
        &shared(),
        &[
            "SELECT pg_terminate_backend(123)",
            "SELECT pg_cancel_backend(1)",
            "SELECT pg_catalog.pg_signal_backend(1, 15)",
            "SELECT \"pg_terminate_backend\"(1)",
            "SELECT U&\"pg_terminate\\005fbackend\"(1)",
            "SELECT pid, query FROM pg_stat_activity",
            "SELECT * FROM pg_catalog.pg_stat_activity",
            "SELECT pg_stat_get_activity(NULL)",
            "SELECT pg_stat_get_backend_activity(1)",
            "SELECT * FROM pg_locks",
            "SELECT pg_blocking_pids(1)",
            "SELECT * FROM pg_stat_statements",
            "SELECT lo_import('/etc/passwd')",
            "SELECT lo_export(1, '/tmp/x')",
            "SELECT lo_get(1)",
            "SELECT lo_create(0)",
            "SELECT lo_unlink(1)",
            "SELECT loread(0, 1)",
            "SELECT lowrite(0, 'x')",
            "SELECT * FROM dblink('host=x', 'select 1') AS t(x int)",
            "SELECT dblink_exec('host=x', 'select 1')",
            "SELECT query_to_xml('select 1', true, true, '')",
            "SELECT query_to_xml_and_xmlschema('select 1', true, true, '')",
            "SELECT ts_stat('select 1')",
            "SELECT ts_rewrite('a'::tsquery, 'select 1')",
            "SELECT pg_read_file('postgresql.conf')",
            "SELECT * FROM pg_ls_dir('.')",
            "SELECT * FROM pg_prepared_xacts",
            "WITH x AS (SELECT pg_terminate_backend(1)) SELECT 1",
            "COPY (SELECT pg_terminate_backend(1)) TO STDOUT",
            "SELECT 1 FROM t WHERE pg_cancel_backend(pid)",
        ],
    );
}

#[test]
fn other_statement_kinds_are_refused() {
    assert_refused(
        &shared(),
        &[
            "LOCK TABLE items",
            "lock items in access exclusive mode",
            "TRUNCATE items",
            "VACUUM items",
            "ANALYZE items",
            "REINDEX TABLE items",
            "CLUSTER items",
            "CHECKPOINT",
            "LOAD 'plpgsql'",
            "COPY items FROM '/etc/passwd'",
            "COPY items TO PROGRAM 'cat'",
            "COPY items FROM PROGRAM 'id'",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "SECURITY LABEL ON TABLE items IS 'x'",
            "COMMENT ON TABLE items IS 'x'",
            "REFRESH MATERIALIZED VIEW mv",
            "IMPORT FOREIGN SCHEMA s FROM SERVER x INTO y",
            "\"select\" 1",
            "$1",
            "'x'",
            "SET statement_timeout = 0",
            "SET statement_timeout = '1h'",
            "SET statement_timeout = '31s'",
            "SET LOCAL statement_timeout = 999999",
            "SET statement_timeout = '5 fortnights'",
            "SET client_encoding = 'SJIS'",
            "SET NAMES 'BIG5'",
            "SET client_encoding TO gbk",
            "SET client_encoding = '''s-j-i-s'''",
            "SET shared_preload_libraries = 'x'",
            "SET pgtenant.anything = 'x'",
        ],
    );
}

#[test]
fn what_cannot_be_lexed_is_refused() {
    // Refused with PostgreSQL's own syntax error (checked against PostgreSQL 15's scanner):
    // SQLSTATE 42601, its message and the character position of the failing token.
    let cases: &[(&str, &str, usize)] = &[
        (
            "SELECT 'abc",
            "unterminated quoted string at or near \"'abc\"",
            8,
        ),
        (
            "SELECT $$unterminated",
            "unterminated dollar-quoted string at or near \"$$unterminated\"",
            8,
        ),
        (
            "SELECT $tag$ x $other$",
            "unterminated dollar-quoted string at or near \"$tag$ x $other$\"",
            8,
        ),
        (
            "SELECT /* x",
            "unterminated /* comment at or near \"/* x\"",
            8,
        ),
        (
            "SELECT /* nested /* */",
            "unterminated /* comment at or near \"/* nested /* */\"",
            8,
        ),
        (
            "SELECT \"\"",
            "zero-length delimited identifier at or near \"\"\"\"",
            8,
        ),
        (
            "SELECT 1; SELECT \"abc",
            "unterminated quoted identifier at or near \"\"abc\"",
            18,
        ),
        (
            "SELECT E'ab\\'",
            "unterminated quoted string at or near \"E'ab\\'\"",
            8,
        ),
        (
            "SELECT B'01",
            "unterminated bit string literal at or near \"B'01\"",
            8,
        ),
        (
            "SELECT X'ab",
            "unterminated hexadecimal string literal at or near \"X'ab\"",
            8,
        ),
        (
            "SELECT 'h\u{e9}llo', 'x",
            "unterminated quoted string at or near \"'x\"",
            17,
        ),
    ];
    for (sql, message, position) in cases {
        for policy in [shared(), dedicated(), pooled()] {
            let r = policy
                .check(sql.as_bytes(), true)
                .refusal
                .unwrap_or_else(|| panic!("passed but cannot be lexed: {sql}"));
            assert_eq!(
                (r.sqlstate, r.message.as_str(), r.position),
                ("42601", *message, Some(*position)),
                "{sql}"
            );
        }
    }
    // An invalid Unicode escape is refused with 42601 too.
    let r = shared()
        .check(b"SELECT U&\"\\zzzz\"", true)
        .refusal
        .unwrap();
    assert_eq!(r.sqlstate, "42601");
    // With standard_conforming_strings off, \' does not end a string: the text hides
    // nothing, and the same bytes lex differently.
    let sql = b"SELECT 'a\\'; SELECT set_config('app.current_tenant_id', 'x', false) --'";
    assert!(shared().check(sql, true).refusal.is_some());
    assert!(shared().check(sql, false).refusal.is_none());
}

#[test]
fn schema_tenants_cannot_move_their_search_path() {
    assert_refused(
        &schema(),
        &[
            "SET search_path = other",
            "SET search_path TO t_other, public",
            "SET SCHEMA 'other'",
            "SET LOCAL search_path = pg_temp",
            "RESET search_path",
            "SELECT set_config('search_path', 'x', false)",
        ],
    );
    assert_allowed(&shared(), &["SET SCHEMA 'other'", "RESET search_path"]);
}

#[test]
fn read_only_users_stay_read_only() {
    assert_refused(
        &readonly(),
        &[
            "SET default_transaction_read_only = off",
            "SET default_transaction_read_only = false",
            "SET default_transaction_read_only TO 0",
            "SET SESSION default_transaction_read_only = 'off'",
            "SET transaction_read_only = off",
            "BEGIN READ WRITE",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "SET TRANSACTION READ WRITE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "RESET default_transaction_read_only",
        ],
    );
    assert_allowed(
        &readonly(),
        &[
            "SET default_transaction_read_only = on",
            "BEGIN READ ONLY",
            "SELECT 1",
            "RESET ALL",
        ],
    );
    assert_refused(
        &Policy {
            readonly: true,
            ..dedicated()
        },
        &[
            "SET default_transaction_read_only = off",
            "BEGIN READ WRITE",
        ],
    );
}

#[test]
fn dedicated_placements_skip_the_tenant_rules() {
    assert_allowed(
        &dedicated(),
        &[
            "DO $$ BEGIN END $$",
            "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
            "SELECT pg_terminate_backend(1)",
            "CREATE TABLE t (x int)",
            "ALTER TABLE t ADD COLUMN y int",
            "SET ROLE other",
            "LISTEN events",
            "TRUNCATE t",
            "SET client_encoding = 'UTF8'",
        ],
    );
    assert!(
        dedicated()
            .check(b"LISTEN events", true)
            .rewritten
            .is_none()
    );
    // The plan's timeout and the tenant context still hold.
    assert_refused(
        &dedicated(),
        &[
            "SET statement_timeout = 0",
            "SET app.current_tenant_id = 'x'",
            "SELECT set_config('app.current_tenant_id', 'x', false)",
            "SELECT set_config('pgtenant.context', 'x', false)",
            "SELECT set_config(name, 'x', false) FROM t",
            "SET client_encoding = 'SJIS'",
            "SET standard_conforming_strings = off",
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
            "ALTER ROLE CURRENT_USER SET app.current_tenant_id = 'x'",
            "alter user pgtenant_app set pgtenant.context to 'x'",
            "ALTER DATABASE d SET standard_conforming_strings = off",
            "ALTER ROLE CURRENT_USER IN DATABASE d RESET ALL",
        ],
    );
}

#[test]
fn ddl_tenants_may_manage_their_tables_but_not_code() {
    assert_allowed(
        &ddl(),
        &[
            "CREATE TABLE t (x int)",
            "CREATE UNIQUE INDEX i ON t (x)",
            "CREATE INDEX i2 ON t (x)",
            "ALTER TABLE t ADD COLUMN y int",
            "DROP INDEX i",
            "DROP TABLE t",
            "TRUNCATE t",
            "CREATE SEQUENCE s",
            "COMMENT ON TABLE t IS 'x'",
        ],
    );
    assert_refused(
        &ddl(),
        &[
            "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
            "DO $$ $$",
            "ALTER ROLE x SUPERUSER",
            "CREATE VIEW v AS SELECT 1",
            "SET search_path = other",
        ],
    );
}

#[test]
fn channel_names_that_are_not_utf8_are_refused() {
    // Found by fuzzing: the bytes were replaced on the way into the rewrite.
    let v = shared().check(b"notify \n\xb3\xc6\xc6", true);
    assert!(v.refusal.is_some());
}

fn pooled() -> Policy {
    Policy {
        prepared_prefix: Some("pgt_c7_".into()),
        ..shared()
    }
}

#[test]
fn transaction_pooling_reports_session_effects() {
    let cases: Vec<(&str, Vec<Effect>, Option<&str>)> = vec![
        (
            "SET work_mem = '64MB'",
            vec![Effect::Set {
                key: "work_mem".into(),
                pairs: vec![("work_mem".into(), "64MB".into())],
            }],
            None,
        ),
        ("SET LOCAL work_mem = '64MB'", vec![], None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", vec![], None),
        (
            "set time zone 'UTC'",
            vec![Effect::Set {
                key: "timezone".into(),
                pairs: vec![("timezone".into(), "UTC".into())],
            }],
            None,
        ),
        (
            "SET SESSION datestyle TO ISO, DMY",
            vec![Effect::Set {
                key: "datestyle".into(),
                pairs: vec![("datestyle".into(), "iso, dmy".into())],
            }],
            None,
        ),
        (
            "RESET work_mem",
            vec![Effect::Reset("work_mem".into())],
            None,
        ),
        ("RESET ALL", vec![Effect::ResetAll], None),
        ("DISCARD ALL", vec![Effect::DiscardAll], None),
        (
            "LISTEN ev",
            vec![Effect::Listen("acme.ev".into())],
            Some("LISTEN \"acme.ev\""),
        ),
        ("UNLISTEN *", vec![Effect::UnlistenAll], None),
        (
            "PREPARE q (int) AS SELECT $1",
            vec![Effect::Prepare {
                server_name: "pgt_c7_q".into(),
                sql: "PREPARE \"pgt_c7_q\" (int) AS SELECT $1".into(),
            }],
            Some("PREPARE \"pgt_c7_q\" (int) AS SELECT $1"),
        ),
        (
            "EXECUTE q(1); DEALLOCATE q",
            vec![
                Effect::Execute("pgt_c7_q".into()),
                Effect::Deallocate("pgt_c7_q".into()),
            ],
            Some("EXECUTE \"pgt_c7_q\"(1); DEALLOCATE \"pgt_c7_q\""),
        ),
        (
            "DEALLOCATE PREPARE q",
            vec![Effect::Deallocate("pgt_c7_q".into())],
            Some("DEALLOCATE PREPARE \"pgt_c7_q\""),
        ),
        ("DEALLOCATE ALL", vec![Effect::DeallocateAll], None),
        ("SELECT 1", vec![], None),
        ("BEGIN", vec![], None),
        ("COMMIT", vec![], None),
        ("END AND NO CHAIN", vec![], None),
        ("COMMIT AND CHAIN", vec![Effect::CommitChain], None),
        ("ROLLBACK", vec![Effect::Rollback], None),
        ("abort work and chain", vec![Effect::Rollback], None),
        ("SAVEPOINT s1", vec![Effect::Savepoint("s1".into())], None),
        (
            "ROLLBACK TRANSACTION TO SAVEPOINT S1",
            vec![Effect::RollbackTo("s1".into())],
            None,
        ),
        (
            "ROLLBACK TO s1",
            vec![Effect::RollbackTo("s1".into())],
            None,
        ),
        (
            "RELEASE SAVEPOINT s1",
            vec![Effect::Release("s1".into())],
            None,
        ),
        ("RELEASE s1", vec![Effect::Release("s1".into())], None),
        (
            "CREATE TEMP TABLE t (x int)",
            vec![Effect::Pin("a temporary table")],
            None,
        ),
        (
            "create global temporary table t (x int)",
            vec![Effect::Pin("a temporary table")],
            None,
        ),
        (
            "SELECT 1 AS x INTO TEMP t",
            vec![Effect::Pin("a temporary table")],
            None,
        ),
        ("SELECT temp FROM weather", vec![], None),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            vec![Effect::Pin("a WITH HOLD cursor")],
            None,
        ),
        ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", vec![], None),
    ];
    for (sql, effects, rewritten) in cases {
        let v = pooled().check(sql.as_bytes(), true);
        assert!(v.refusal.is_none(), "{sql}: {v:?}");
        assert_eq!(v.effects, effects, "{sql}");
        assert_eq!(v.rewritten.as_deref(), rewritten, "{sql}");
    }
    // Session pooling reports none.
    assert!(
        shared()
            .check(b"SET work_mem = '1MB'", true)
            .effects
            .is_empty()
    );
}

#[test]
fn the_plans_statement_timeout_is_a_ceiling_reset_and_default_cannot_lift() {
    for policy in [shared(), dedicated(), pooled()] {
        let cases = [
            (
                "RESET statement_timeout",
                "SET statement_timeout TO '30000ms'",
            ),
            (
                "reset STATEMENT_TIMEOUT; select 1",
                "SET statement_timeout TO '30000ms'; select 1",
            ),
            (
                "SET statement_timeout TO DEFAULT",
                "SET statement_timeout TO '30000ms'",
            ),
            (
                "SET SESSION statement_timeout = default",
                "SET SESSION statement_timeout = '30000ms'",
            ),
            (
                "SET LOCAL statement_timeout TO DEFAULT",
                "SET LOCAL statement_timeout TO '30000ms'",
            ),
        ];
        for (sql, rewritten) in cases {
            let v = policy.check(sql.as_bytes(), true);
            assert!(v.refusal.is_none(), "{sql}: {v:?}");
            assert_eq!(v.rewritten.as_deref(), Some(rewritten), "{sql}");
        }
        assert_refused(
            &policy,
            &[
                "SET statement_timeout = 0",
                "SET statement_timeout TO '0'",
                "SELECT set_config('statement_timeout', NULL, false)",
                "SELECT set_config('statement_timeout', '0', false)",
            ],
        );
    }
    // Without a plan limit nothing is rewritten.
    let free = Policy {
        max_statement_timeout: None,
        ..shared()
    };
    assert_eq!(free.check(b"RESET statement_timeout", true).rewritten, None);
}

#[test]
fn advisory_lock_keys_move_into_the_tenants_namespace() {
    let cases = [
        (
            "SELECT pg_advisory_lock(4242)",
            "SELECT pg_advisory_lock((4242)::bigint # '-9223372036854775807'::bigint)",
        ),
        (
            "select pg_catalog.pg_try_advisory_xact_lock(1, f(2, 3))",
            "select pg_catalog.pg_try_advisory_xact_lock((1)::integer # '-2147483648'::integer, ( f(2, 3))::integer # '1'::integer)",
        ),
        (
            "SELECT pg_advisory_unlock(pg_advisory_lock_shared(1)::int::bigint)",
            "SELECT pg_advisory_unlock((pg_advisory_lock_shared((1)::bigint # '-9223372036854775807'::bigint)::int::bigint)::bigint # '-9223372036854775807'::bigint)",
        ),
        (
            "SELECT pg_advisory_unlock_all()",
            "SELECT pg_advisory_unlock_all()",
        ),
    ];
    for (sql, rewritten) in cases {
        let v = shared().check(sql.as_bytes(), true);
        assert!(v.refusal.is_none(), "{sql}: {v:?}");
        assert_eq!(v.rewritten.as_deref().unwrap_or(sql), rewritten, "{sql}");
    }
    assert_refused(
        &shared(),
        &[
            "SELECT pg_advisory_lock()",
            "SELECT pg_advisory_lock(1, 2, 3)",
            "SELECT pg_advisory_lock",
            "SELECT pg_advisory_lock(1",
        ],
    );
    // Dedicated placements keep PostgreSQL's keys.
    assert_eq!(
        dedicated()
            .check(b"SELECT pg_advisory_lock(4242)", true)
            .rewritten,
        None
    );
    // Session-level locks pin the connection in transaction pooling; xact ones do not.
    assert_eq!(
        pooled()
            .check(b"SELECT pg_try_advisory_lock(1)", true)
            .effects,
        vec![Effect::Pin("a session advisory lock")]
    );
    assert!(
        pooled()
            .check(b"SELECT pg_advisory_xact_lock(1)", true)
            .effects
            .is_empty()
    );
}

#[test]
fn pg_prepared_statements_is_replaced_by_the_clients_view() {
    let v = pooled().check(b"SELECT * FROM pg_prepared_statements", true);
    assert!(v.wants_prepared_view && v.refusal.is_none());
    // Session pooling leaves it alone.
    assert!(
        !shared()
            .check(b"SELECT * FROM pg_prepared_statements", true)
            .wants_prepared_view
    );
    let p = Policy {
        prepared_view: Some("(VIEW)".into()),
        ..pooled()
    };
    for (sql, rewritten) in [
        (
            "SELECT name FROM pg_prepared_statements",
            "SELECT name FROM (VIEW) AS pg_prepared_statements",
        ),
        (
            "select pg_prepared_statements.name from pg_catalog.pg_prepared_statements where true",
            "select pg_prepared_statements.name from (VIEW) AS pg_prepared_statements where true",
        ),
        (
            "SELECT p.name FROM pg_prepared_statements p",
            "SELECT p.name FROM (VIEW) p",
        ),
        (
            "SELECT ps.name FROM \"pg_prepared_statements\" AS ps",
            "SELECT ps.name FROM (VIEW) AS ps",
        ),
    ] {
        let v = p.check(sql.as_bytes(), true);
        assert!(!v.wants_prepared_view && v.refusal.is_none(), "{sql}");
        assert_eq!(v.rewritten.as_deref(), Some(rewritten), "{sql}");
    }
}

/// `set_config` with query parameters passes the text check and is checked again with the
/// values a Bind gives: the same rules as literals.
#[test]
fn set_config_parameters_are_checked_with_their_values() {
    use crate::tenant::guard::{Bound, parse_bool};
    let policy = Policy {
        readonly: true,
        max_statement_timeout: Some(std::time::Duration::from_secs(60)),
        ..shared()
    };
    let verdict = policy.check(b"select set_config($1, $2::text, false)", true);
    assert!(verdict.refusal.is_none(), "{verdict:?}");
    let [call] = verdict.bound_settings.as_slice() else {
        panic!("one call expected: {verdict:?}");
    };
    let text = |v: &'static str| {
        Some(Bound {
            value: Some(v.as_bytes()),
            binary: false,
        })
    };
    let run = |name: Option<Bound<'static>>, value: Option<Bound<'static>>| {
        policy.check_bound_set_config(call, true, move |n| match n {
            1 => name.as_ref().map(|b| Bound {
                value: b.value,
                binary: b.binary,
            }),
            2 => value.as_ref().map(|b| Bound {
                value: b.value,
                binary: b.binary,
            }),
            _ => None,
        })
    };
    for (name, value) in [
        ("app.current_tenant_id", "x"),
        ("APP.Current_Tenant_ID", "x"),
        ("pgtenant.context", "x"),
        ("role", "postgres"),
        ("statement_timeout", "0"),
        ("statement_timeout", "2h"),
        ("default_transaction_read_only", "off"),
        ("client_encoding", "SJIS"),
        ("standard_conforming_strings", "off"),
        ("backslash_quote", "on"),
        ("shared_buffers", "1GB"),
    ] {
        let r = run(text(name), text(value));
        assert!(r.is_err(), "{name} = {value} should be refused: {r:?}");
    }
    // NULL resets: refused where the reset would lift a limit.
    for name in ["statement_timeout", "default_transaction_read_only"] {
        assert!(
            run(
                text(name),
                Some(Bound {
                    value: None,
                    binary: false
                })
            )
            .is_err()
        );
    }
    assert_eq!(
        run(
            text("work_mem"),
            Some(Bound {
                value: None,
                binary: false
            })
        )
        .unwrap(),
        Some(Effect::Reset("work_mem".into()))
    );
    assert_eq!(
        run(text("Work_Mem"), text("64MB")).unwrap(),
        Some(Effect::Set {
            key: "work_mem".into(),
            pairs: vec![("work_mem".into(), "64MB".into())]
        })
    );
    assert_eq!(
        run(text("statement_timeout"), text(" 5s ")).unwrap(),
        Some(Effect::Set {
            key: "statement_timeout".into(),
            pairs: vec![("statement_timeout".into(), " 5s ".into())]
        })
    );
    // A NULL name is the server's error; a value that is not UTF-8 or holds NUL is refused.
    assert_eq!(
        run(
            Some(Bound {
                value: None,
                binary: false
            }),
            text("x")
        )
        .unwrap(),
        None
    );
    assert!(
        run(
            Some(Bound {
                value: Some(b"work_mem\0x"),
                binary: false
            }),
            text("1MB")
        )
        .is_err()
    );
    assert!(
        run(
            text("work_mem"),
            Some(Bound {
                value: Some(b"\xff"),
                binary: true
            })
        )
        .is_err()
    );
    assert!(run(None, text("1MB")).is_err());

    // is_local: true changes nothing past the transaction; a bound one is read as PostgreSQL.
    let local = policy.check(b"SELECT set_config('work_mem', '1MB', $1)", true);
    let [call] = local.bound_settings.as_slice() else {
        panic!("{local:?}");
    };
    let with = |v: Bound<'static>| {
        policy.check_bound_set_config(call, true, move |_| {
            Some(Bound {
                value: v.value,
                binary: v.binary,
            })
        })
    };
    assert_eq!(
        with(Bound {
            value: Some(b"on"),
            binary: false
        })
        .unwrap(),
        None
    );
    assert_eq!(
        with(Bound {
            value: Some(&[1]),
            binary: true
        })
        .unwrap(),
        None
    );
    assert!(
        with(Bound {
            value: Some(b"off"),
            binary: false
        })
        .unwrap()
        .is_some()
    );
    assert!(
        with(Bound {
            value: Some(b"maybe"),
            binary: false
        })
        .is_err()
    );
    assert!(call.check_types(&[16]).is_ok());
    assert!(call.check_types(&[25]).is_err());
    assert!(verdict.bound_settings[0].check_types(&[0, 1043]).is_ok());
    assert!(verdict.bound_settings[0].check_types(&[1042, 25]).is_err());
    assert!(verdict.bound_settings[0].check_types(&[19]).is_err());

    for (text, value) in [
        ("t", Some(true)),
        (" YES ", Some(true)),
        ("on", Some(true)),
        ("1", Some(true)),
        ("f", Some(false)),
        ("off", Some(false)),
        ("No", Some(false)),
        ("o", None),
        ("", None),
        ("2", None),
    ] {
        assert_eq!(parse_bool(text), value, "{text:?}");
    }
}

/// With transaction pooling a session-level set_config is replayed like SET, and one whose
/// value cannot be known is refused (it would stay behind on the server connection).
#[test]
fn session_level_set_config_is_replayed_in_transaction_mode() {
    let p = Policy {
        prepared_prefix: Some("pgt_c1_".into()),
        ..shared()
    };
    let v = p.check(
        b"SELECT set_config('work_mem', '8MB', false), set_config('lock_timeout', '1s', true)",
        true,
    );
    assert!(v.refusal.is_none(), "{v:?}");
    assert_eq!(
        v.effects,
        vec![Effect::Set {
            key: "work_mem".into(),
            pairs: vec![("work_mem".into(), "8MB".into())]
        }]
    );
    let v = p.check(b"SELECT set_config('work_mem', NULL, false)", true);
    assert_eq!(v.effects, vec![Effect::Reset("work_mem".into())]);
    assert_refused(
        &p,
        &[
            "SELECT set_config('work_mem', w, false) FROM t",
            "SELECT set_config('work_mem', '1MB', is_local) FROM t",
        ],
    );
    // Session pooling needs no replay: an expression is the server's business there.
    assert_allowed(
        &shared(),
        &["SELECT set_config('work_mem', w, false) FROM t"],
    );
}

/// The quick first-letters check never lets a denied name through.
#[test]
fn every_denied_name_is_caught() {
    for name in super::policy::denied_names() {
        assert!(super::policy::is_denied(name), "{name}");
    }
    assert!(!super::policy::is_denied("pgbench_accounts"));
}
