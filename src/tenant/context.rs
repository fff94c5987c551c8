//! The verified tenant context (DESIGN.md §5 S1b). The guard is one wall; this is the one the
//! database enforces. Each shared shard has a secret key (`context_key_file`, written by
//! `pgtenant shard init`). When pgtenant binds a tenant on a server connection it also sets
//! `pgtenant.context` to a token `tenant:pid:counter:mac`, where the MAC is HMAC-SHA-256 over
//! `tenant:pid:counter` with the shard's key, always as a Bind parameter (never query text, so
//! `pg_stat_activity` never shows it). RLS policies read `pgtenant.tenant_id()`, a SECURITY
//! DEFINER function that recomputes the MAC with the key (which the login role cannot read)
//! and returns the tenant only when the token is pgtenant's and names the calling backend. A
//! client can write `pgtenant.context` or `app.current_tenant_id` as it likes: without the key
//! it cannot make a token, and a token from another backend does not verify.
//!
//! HMAC is RFC 2104; the database computes it with the built-in `sha256()` over the key's
//! inner and outer pads, stored (not the key itself) in a table only the function can read.

use std::fmt::Write as _;

use sha2::Sha256;

use super::TenantId;
pub use crate::domain::context_key::{ContextKey, KeyError};

/// The namespace of `tenant`'s advisory lock keys on a shared shard: keyed by the shard's
/// context key when it has one (then no tenant can compute another's namespace), else a
/// plain hash of the tenant id.
pub fn lock_salt(key: Option<&ContextKey>, tenant: TenantId) -> u64 {
    if let Some(key) = key {
        return key.lock_salt(tenant);
    }
    use sha2::Digest as _;
    let out = Sha256::digest(format!("pgtenant advisory-locks:{tenant}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// The setting that carries the token.
pub const CONTEXT_SETTING: &str = "pgtenant.context";
/// The objects `shard init` installs (idempotent). `login` is the role pgtenant logs in as:
/// it may call the function, never read the key. Schema `pgtenant` is owned by the admin.
pub fn install_sql(login: &str) -> String {
    format!(
        r#"CREATE SCHEMA IF NOT EXISTS pgtenant;
REVOKE ALL ON SCHEMA pgtenant FROM PUBLIC;
CREATE TABLE IF NOT EXISTS pgtenant.context_key (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    inner_pad bytea NOT NULL,
    outer_pad bytea NOT NULL);
REVOKE ALL ON TABLE pgtenant.context_key FROM PUBLIC;
CREATE OR REPLACE FUNCTION pgtenant.tenant_id() RETURNS pg_catalog.uuid
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
AS $fn$
-- Every name below is schema-qualified, operators included, so the caller's search_path
-- cannot substitute its own objects (a SET search_path clause would do the same at about
-- twice the cost per call). plpgsql keeps its plans for the session: the cost per query is
-- one key read and four SHA-256 of a few dozen bytes.
DECLARE
    p pg_catalog.text[] := pg_catalog.string_to_array(
        pg_catalog.current_setting('{CONTEXT_SETTING}', true), ':');
    k record;
BEGIN
    IF pg_catalog.array_length(p, 1) IS NULL
       OR pg_catalog.array_length(p, 1) OPERATOR(pg_catalog.<>) 4
       OR p[2] OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()::pg_catalog.text THEN
        RETURN NULL;
    END IF;
    SELECT c.inner_pad, c.outer_pad INTO k FROM pgtenant.context_key c;
    -- HMAC-SHA-256 (RFC 2104) over tenant:pid:counter; the two hex MACs are compared through
    -- another hash so the comparison's timing says nothing about the expected MAC.
    IF pg_catalog.sha256(pg_catalog.convert_to(p[4], 'SQL_ASCII'))
       OPERATOR(pg_catalog.=) pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.encode(
           pg_catalog.sha256(k.outer_pad OPERATOR(pg_catalog.||) pg_catalog.sha256(
               k.inner_pad OPERATOR(pg_catalog.||) pg_catalog.convert_to(
                   p[1] OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) p[2]
                   OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) p[3], 'SQL_ASCII'))),
           'hex'), 'SQL_ASCII')) THEN
        RETURN p[1]::pg_catalog.uuid;
    END IF;
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION pgtenant.tenant_id() FROM PUBLIC;
GRANT USAGE ON SCHEMA pgtenant TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgtenant.tenant_id() TO PUBLIC;
COMMENT ON FUNCTION pgtenant.tenant_id() IS
  'The tenant pgtenant bound on this backend, verified with the shard key; NULL when none. Use (SELECT pgtenant.tenant_id()) in RLS policies.';
-- pgtenant's login role: no access to other sessions' activity, locks or settings.
DO $do$ BEGIN
  IF (SELECT rolsuper FROM pg_roles WHERE rolname = {login_literal}) THEN
    RAISE EXCEPTION 'the login role % is a superuser: RLS does not apply to it', {login_literal};
  END IF;
END $do$;
"#,
        login_literal = super::quote_literal(login),
    )
}

/// Catalog objects that show other sessions' queries, locks, prepared transactions or signal
/// them, for every role without `pg_read_all_stats`: `(kind, signature)`.
pub const HARDENED: &[(&str, &str)] = &[
    ("TABLE", "pg_catalog.pg_stat_activity"),
    ("TABLE", "pg_catalog.pg_locks"),
    ("TABLE", "pg_catalog.pg_prepared_xacts"),
    ("TABLE", "pg_catalog.pg_stat_ssl"),
    ("TABLE", "pg_catalog.pg_stat_gssapi"),
    ("TABLE", "pg_catalog.pg_stat_progress_vacuum"),
    ("TABLE", "pg_catalog.pg_stat_progress_analyze"),
    ("TABLE", "pg_catalog.pg_stat_progress_create_index"),
    ("TABLE", "pg_catalog.pg_stat_progress_copy"),
    ("TABLE", "pg_catalog.pg_stat_progress_cluster"),
    ("TABLE", "pg_catalog.pg_stat_progress_basebackup"),
    ("FUNCTION", "pg_catalog.pg_stat_get_activity(integer)"),
    ("FUNCTION", "pg_catalog.pg_lock_status()"),
    ("FUNCTION", "pg_catalog.pg_prepared_xact()"),
    ("FUNCTION", "pg_catalog.pg_blocking_pids(integer)"),
    (
        "FUNCTION",
        "pg_catalog.pg_safe_snapshot_blocking_pids(integer)",
    ),
    ("FUNCTION", "pg_catalog.pg_stat_get_backend_idset()"),
    ("FUNCTION", "pg_catalog.pg_stat_get_backend_pid(integer)"),
    (
        "FUNCTION",
        "pg_catalog.pg_stat_get_backend_activity(integer)",
    ),
    (
        "FUNCTION",
        "pg_catalog.pg_stat_get_backend_activity_start(integer)",
    ),
    (
        "FUNCTION",
        "pg_catalog.pg_stat_get_backend_xact_start(integer)",
    ),
    ("FUNCTION", "pg_catalog.pg_stat_get_backend_start(integer)"),
    (
        "FUNCTION",
        "pg_catalog.pg_stat_get_backend_client_addr(integer)",
    ),
    (
        "FUNCTION",
        "pg_catalog.pg_stat_get_backend_client_port(integer)",
    ),
    ("FUNCTION", "pg_catalog.pg_stat_get_backend_userid(integer)"),
    ("FUNCTION", "pg_catalog.pg_stat_get_backend_dbid(integer)"),
    (
        "FUNCTION",
        "pg_catalog.pg_stat_get_backend_wait_event(integer)",
    ),
    (
        "FUNCTION",
        "pg_catalog.pg_stat_get_backend_wait_event_type(integer)",
    ),
    ("FUNCTION", "pg_catalog.pg_stat_get_progress_info(text)"),
    ("FUNCTION", "pg_catalog.pg_cancel_backend(integer)"),
    (
        "FUNCTION",
        "pg_catalog.pg_terminate_backend(integer, bigint)",
    ),
    ("FUNCTION", "pg_catalog.pg_signal_backend(integer, integer)"),
];

/// SQL that revokes [`HARDENED`] from PUBLIC and gives it back to `pg_read_all_stats`
/// (monitoring roles keep working). Objects this server version lacks are skipped.
pub fn harden_sql() -> String {
    let mut sql = String::from("DO $do$ BEGIN\n");
    for (kind, name) in HARDENED {
        let (exists, privilege) = if *kind == "TABLE" {
            (format!("to_regclass('{name}')"), "SELECT")
        } else {
            (format!("to_regprocedure('{name}')"), "EXECUTE")
        };
        let _ = writeln!(
            sql,
            "  IF {exists} IS NOT NULL THEN \
             EXECUTE 'REVOKE ALL ON {kind} {name} FROM PUBLIC'; \
             EXECUTE 'GRANT {privilege} ON {kind} {name} TO pg_read_all_stats'; END IF;"
        );
    }
    sql.push_str("END $do$;\n");
    sql
}
