//! `set_config` in all its forms: literal and parameter arguments, qualified and quoted names,
//! inside CTEs, cursors, COPY and prepared statements, over simple and extended protocol.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{all_rows, assert_all_refused, assert_isolation_intact, code, start};
use pgtenant::demo::GLOBEX_ID;

#[tokio::test]
async fn set_config_cannot_reach_the_tenant_context() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    let g = GLOBEX_ID;
    let attacks = [
        format!("SELECT set_config('app.current_tenant_id', '{g}', false)"),
        format!("select pg_catalog.set_config('app.current_tenant_id','{g}',false)"),
        format!("SELECT \"set_config\"('app.current_tenant_id', '{g}', false)"),
        format!("SELECT SET_CONFIG('APP.CURRENT_TENANT_ID', '{g}', false)"),
        format!("SELECT set_config('app.' || 'current_tenant_id', '{g}', false)"),
        format!("SELECT set_config(E'app.current\\137tenant_id', '{g}', false)"),
        format!("SELECT set_config($$app.current_tenant_id$$, '{g}', false)"),
        format!("SELECT U&\"set\\005fconfig\"('app.current_tenant_id', '{g}', false)"),
        format!(
            "WITH s AS (SELECT set_config('app.current_tenant_id', '{g}', true)) SELECT * FROM items, s"
        ),
        format!(
            "BEGIN; DECLARE c CURSOR FOR SELECT set_config('app.current_tenant_id','{g}',false); FETCH c"
        ),
        format!("COPY (SELECT set_config('app.current_tenant_id','{g}',false)) TO STDOUT"),
        format!(
            "SELECT * FROM items WHERE set_config('app.current_tenant_id', '{g}', true) IS NOT NULL"
        ),
    ];
    let attacks: Vec<&str> = attacks.iter().map(String::as_str).collect();
    assert_all_refused(&acme, &attacks).await;
    acme.simple_query("ROLLBACK").await.unwrap();
    assert_isolation_intact(&env, &before, &acme).await;
}

#[tokio::test]
async fn set_config_with_bind_parameters_is_refused() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    for sql in [
        "SELECT set_config($1, $2, false)",
        "SELECT set_config($1::text, $2, true)",
        "SELECT pg_catalog.set_config(name, $2, false) FROM (SELECT $1::text AS name) n",
    ] {
        let err = acme
            .query(sql, &[&"app.current_tenant_id", &GLOBEX_ID])
            .await
            .unwrap_err();
        assert_eq!(code(&err), "42501", "{sql}");
    }
    // Its own custom settings stay usable.
    let row = acme
        .query_one(
            "SELECT set_config('myapp.user_id', '42', false), current_setting('myapp.user_id')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "42");
    assert_isolation_intact(&env, &before, &acme).await;
}
