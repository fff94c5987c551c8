//! Code that would run outside the guard's sight: DO blocks, functions, procedures, views,
//! rules and triggers cannot be created on shared placements.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{all_rows, assert_all_refused, assert_isolation_intact, start};
use pgtenant::demo::GLOBEX_ID;

#[tokio::test]
async fn code_cannot_be_run_or_created() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    let g = GLOBEX_ID;
    let attacks = [
        format!("DO $$ BEGIN PERFORM set_config('app.current_tenant_id', '{g}', false); END $$"),
        format!("do 'begin perform set_config(''app.current_tenant_id'', ''{g}'', false); end'"),
        "DO LANGUAGE plpgsql $$ BEGIN UPDATE items SET name = 'pwned'; END $$".to_owned(),
        format!(
            "CREATE FUNCTION f() RETURNS text AS $$ SELECT set_config('app.current_tenant_id', '{g}', false) $$ LANGUAGE sql"
        ),
        "CREATE OR REPLACE FUNCTION pg_temp.f() RETURNS int AS 'select 1' LANGUAGE sql".to_owned(),
        "CREATE PROCEDURE p() LANGUAGE sql AS $$ UPDATE items SET name = 'pwned' $$".to_owned(),
        "CREATE VIEW everyone AS SELECT * FROM items".to_owned(),
        "CREATE TEMP VIEW everyone AS SELECT * FROM items".to_owned(),
        "CREATE RULE r AS ON SELECT TO items DO INSTEAD NOTHING".to_owned(),
        "CREATE TRIGGER t BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION f()".to_owned(),
        "CREATE TABLE public.spy (x text)".to_owned(),
        "CREATE POLICY open ON items USING (true)".to_owned(),
        "ALTER TABLE items DISABLE ROW LEVEL SECURITY".to_owned(),
        "TRUNCATE items".to_owned(),
        "SELECT 1; DO $$ $$".to_owned(),
    ];
    let attacks: Vec<&str> = attacks.iter().map(String::as_str).collect();
    assert_all_refused(&acme, &attacks).await;
    // Temporary tables remain available.
    acme.simple_query(
        "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1); DROP TABLE scratch",
    )
    .await
    .unwrap();
    assert_isolation_intact(&env, &before, &acme).await;
}

/// The guard remembers texts it let through untouched and lets the same bytes through again
/// unchecked. That changes nothing it decides: the same unnamed Parse sent again sees only the
/// tenant's rows, and texts it refuses or rewrites, sent between remembered ones (also
/// pipelined with them), are refused or rewritten every time.
#[tokio::test]
async fn a_remembered_text_changes_nothing_the_guard_decides() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    let remembered = "SELECT count(*), count(*) FILTER (WHERE tenant_id <> current_setting('app.current_tenant_id')::uuid) FROM items WHERE name <> $1";
    let g = GLOBEX_ID;
    let attacks = [
        format!("SELECT set_config('app.current_tenant_id', '{g}', false)"),
        "SELECT pg_read_file('postgresql.conf')".to_owned(),
        format!("SET app.current_tenant_id = '{g}'"),
    ];
    let attacks: Vec<&str> = attacks.iter().map(String::as_str).collect();
    let mut own = None;
    for _ in 0..3 {
        // tokio-postgres sends each query as an unnamed Parse of the same text.
        let row = acme.query_one(remembered, &[&"x"]).await.unwrap();
        assert_eq!(row.get::<_, i64>(1), 0, "another tenant's rows are visible");
        let n = row.get::<_, i64>(0);
        assert_eq!(*own.get_or_insert(n), n);
        assert_all_refused(&acme, &attacks).await;
        // Pipelined: the remembered text and a refused one in the same round trip.
        let (x, tenant): (&str, &str) = ("x", g);
        let with_x: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&x];
        let with_tenant: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&tenant];
        let (ok, refused) = tokio::join!(
            acme.query_one(remembered, &with_x),
            acme.query_one(
                "SELECT set_config('app.current_tenant_id', $1, false)",
                &with_tenant
            ),
        );
        assert_eq!(ok.unwrap().get::<_, i64>(1), 0);
        assert_eq!(common::code(&refused.unwrap_err()), "42501");
        // A statement the guard rewrites (its advisory lock key moves into the tenant's
        // namespace) is rewritten every time.
        acme.simple_query("SELECT pg_advisory_xact_lock(42)")
            .await
            .unwrap();
    }
    assert_isolation_intact(&env, &before, &acme).await;
}
