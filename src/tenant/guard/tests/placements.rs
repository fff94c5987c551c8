//! Rules that depend on the placement and the user: schema tenants, read-only users,
//! dedicated databases, DDL tenants.

use super::*;

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
