//! What real applications send passes; every spelling of what the guard refuses does not.

use super::*;

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
