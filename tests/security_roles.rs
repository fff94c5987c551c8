//! Role changes: a tenant cannot become another role, reset into one, or change roles.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{all_rows, assert_all_refused, assert_isolation_intact, start};

#[tokio::test]
async fn roles_cannot_be_changed() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    assert_all_refused(
        &acme,
        &[
            "SET ROLE postgres",
            "SET ROLE tenant_umbrella",
            "SET LOCAL ROLE postgres",
            "SET role = 'postgres'",
            "SET SESSION AUTHORIZATION postgres",
            "SET SESSION AUTHORIZATION DEFAULT",
            "RESET ROLE",
            "RESET SESSION AUTHORIZATION",
            "SELECT set_config('role', 'postgres', false)",
            "ALTER ROLE pgtenant_app BYPASSRLS",
            "ALTER USER pgtenant_app SUPERUSER",
            "ALTER SYSTEM SET row_security = off",
            "GRANT tenant_umbrella TO pgtenant_app",
            "SET session_replication_role = replica",
        ],
    )
    .await;
    let who: String = acme
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "pgtenant_app");
    assert_isolation_intact(&env, &before, &acme).await;
}

#[tokio::test]
async fn the_schema_tenant_cannot_leave_its_schema() {
    let env = start().await;
    let before = all_rows(&env);
    let umbrella = env.connect("umbrella").await;
    // Its own role owns only its schema; the shared table is not reachable at all.
    assert!(
        umbrella
            .simple_query("SELECT * FROM public.items")
            .await
            .is_err()
    );
    assert!(
        umbrella
            .simple_query("SET search_path = public; SELECT * FROM items")
            .await
            .is_err()
    );
    assert_eq!(all_rows(&env), before);
}
