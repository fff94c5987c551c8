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
