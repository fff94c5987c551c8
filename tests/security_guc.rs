//! GUC tampering: a tenant tries to change `app.current_tenant_id` (or reset it to something
//! else) in every spelling, through simple and extended protocol. Each attempt is refused and
//! the tenant still sees only its own rows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{all_rows, assert_all_refused, assert_isolation_intact, start};
use pgtenant::demo::{ACME_ID, GLOBEX_ID};

#[tokio::test]
async fn the_tenant_setting_cannot_be_changed_in_any_spelling() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    let g = GLOBEX_ID;
    let attacks = [
        format!("SET app.current_tenant_id = '{g}'"),
        format!("set APP.CURRENT_TENANT_ID to '{g}'"),
        format!("SET \"app\".\"current_tenant_id\" = '{g}'"),
        format!("SET \"app.current_tenant_id\" = '{g}'"),
        format!("SET SESSION app.current_tenant_id = '{g}'"),
        format!("SET/**/app.current_tenant_id='{g}'"),
        format!("SET U&\"app.current\\005ftenant_id\" = '{g}'"),
        format!("SELECT 1; SET app.current_tenant_id = '{g}'"),
        format!("BEGIN; SET LOCAL app.current_tenant_id = '{g}'; SELECT * FROM items; COMMIT"),
        "RESET app.current_tenant_id".to_owned(),
        format!("PREPARE p AS SELECT set_config('app.current_tenant_id', '{g}', false)"),
    ];
    let attacks: Vec<&str> = attacks.iter().map(String::as_str).collect();
    assert_all_refused(&acme, &attacks).await;
    // A refused statement inside a transaction aborts it, as any error would.
    acme.simple_query("ROLLBACK").await.unwrap();
    assert_isolation_intact(&env, &before, &acme).await;
}

#[tokio::test]
async fn extended_protocol_gets_the_same_refusals() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    let err = acme
        .prepare(&format!("SET app.current_tenant_id = '{GLOBEX_ID}'"))
        .await
        .unwrap_err();
    assert_eq!(common::code(&err), "42501");
    let err = acme
        .query(
            "SELECT set_config('app.current_tenant_id', $1, false)",
            &[&GLOBEX_ID],
        )
        .await
        .unwrap_err();
    assert_eq!(common::code(&err), "42501");
    // The session goes on with its own context.
    assert_isolation_intact(&env, &before, &acme).await;
}

#[tokio::test]
async fn reset_all_and_discard_all_keep_the_tenant_bound() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    for reset in [
        "RESET ALL",
        "DISCARD ALL",
        "SET application_name = 'x'; RESET ALL",
    ] {
        acme.simple_query(reset).await.unwrap();
        let row = acme
            .query_one(
                "SELECT current_setting('app.current_tenant_id'), count(*)::int FROM items",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), ACME_ID, "after {reset}");
        assert_eq!(row.get::<_, i32>(1), 2, "after {reset}");
    }
    // Pipelined right behind the reset, with no round trip in between: the rebind is
    // injected before the next message reaches the server.
    let (reset, row) = tokio::join!(
        acme.simple_query("DISCARD ALL"),
        acme.query_one("SELECT current_setting('app.current_tenant_id')", &[])
    );
    reset.unwrap();
    assert_eq!(row.unwrap().get::<_, String>(0), ACME_ID);
    assert_isolation_intact(&env, &before, &acme).await;
}

#[tokio::test]
async fn turning_standard_conforming_strings_off_does_not_hide_statements() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    // The setting cannot be turned off at all (it would change how the server reads the
    // next message before the guard hears of it).
    assert_eq!(
        common::sqlstate_of(&acme, "SET standard_conforming_strings = off")
            .await
            .as_deref(),
        Some("42501")
    );
    acme.simple_query("SET standard_conforming_strings = on")
        .await
        .unwrap();
    let smuggled = format!("SELECT 'a\\'; SET app.current_tenant_id = '{GLOBEX_ID}' --'");
    assert_eq!(
        common::sqlstate_of(&acme, &smuggled).await.as_deref(),
        Some("42501")
    );
    assert_isolation_intact(&env, &before, &acme).await;
}
