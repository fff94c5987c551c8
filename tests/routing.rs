//! Tenants reach their own data and nothing else: shared tenants through row-level security,
//! the schema tenant through its bound search_path and role, the dedicated tenant in its own
//! database. Checked with tokio-postgres and with psql against real PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{code, psql, start, start_with};
use pgtenant::demo::{ACME_ID, GLOBEX_ID, INITECH_ID, UMBRELLA_ID};

async fn names(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[tokio::test]
async fn shared_tenants_each_see_only_their_own_rows() {
    let env = start().await;
    let acme = env.connect("acme").await;
    let globex = env.connect("globex").await;
    assert_eq!(
        names(&acme, "SELECT name FROM items ORDER BY id").await,
        ["acme anvil", "acme rocket skates"]
    );
    assert_eq!(
        names(&globex, "SELECT name FROM items ORDER BY id").await,
        ["globex doomsday device"]
    );

    // Writes land in the writer's tenant and stay invisible to the other.
    acme.execute("INSERT INTO items (name) VALUES ('acme new')", &[])
        .await
        .unwrap();
    let err = acme
        .execute(
            "INSERT INTO items (tenant_id, name) VALUES ($1::text::uuid, 'forged')",
            &[&GLOBEX_ID],
        )
        .await
        .unwrap_err();
    assert_eq!(
        code(&err),
        "42501",
        "RLS WITH CHECK refuses a forged tenant_id"
    );
    assert_eq!(
        names(&globex, "SELECT name FROM items ORDER BY id").await,
        ["globex doomsday device"]
    );
    let updated = globex
        .execute(
            "UPDATE items SET name = 'hacked' WHERE name LIKE 'acme%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 0, "globex cannot touch acme's rows");
    let owners = env.admin_a("SELECT count(*) FROM items WHERE tenant_id = '6f1c2b7e-1d0a-4c39-9d0e-6f3b2a1c9e01' AND name <> 'hacked'");
    assert_eq!(owners.trim(), "3");
}

#[tokio::test]
async fn the_tenant_context_is_the_tenants_id() {
    let env = start().await;
    for (tenant, id) in [
        ("acme", ACME_ID),
        ("globex", GLOBEX_ID),
        ("umbrella", UMBRELLA_ID),
        ("initech", INITECH_ID),
    ] {
        let c = env.connect(tenant).await;
        let row = c
            .query_one("SELECT current_setting('app.current_tenant_id')", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), id, "{tenant}");
    }
}

/// A dedicated placement's connections are bound when they are set up for the tenant, not at
/// every transaction: the context must hold over many transactions, over the client's RESET
/// ALL and DISCARD ALL, and for every client that gets the connection next.
#[tokio::test]
async fn a_dedicated_tenant_keeps_its_context_without_a_binding_per_transaction() {
    let env = start_with("", |t| {
        t.replace("max_connections = 20", "max_connections = 1")
    })
    .await;
    let first = env.connect("initech").await;
    let second = env.connect("initech").await;
    let context = "SELECT current_setting('app.current_tenant_id', true)";
    for round in 0..20 {
        let client = if round % 2 == 0 { &first } else { &second };
        if round == 7 {
            client.batch_execute("RESET ALL").await.unwrap();
        }
        if round == 13 {
            client.batch_execute("DISCARD ALL").await.unwrap();
        }
        let row = client.query_one(context, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), INITECH_ID, "round {round}");
        // Within an explicit transaction too.
        let tx = client
            .simple_query(&format!("BEGIN; {context}; COMMIT"))
            .await
            .unwrap();
        assert_eq!(
            common::first_value(&tx),
            INITECH_ID,
            "round {round} in a transaction"
        );
    }
    // Changing it stays refused, by SET and by set_config.
    for attack in [
        "SET app.current_tenant_id = '00000000-0000-0000-0000-000000000000'",
        "SELECT set_config('app.current_tenant_id', '00000000-0000-0000-0000-000000000000', false)",
    ] {
        let err = first.batch_execute(attack).await.unwrap_err();
        assert_eq!(code(&err), "42501", "{attack}");
    }
    let row = second.query_one(context, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), INITECH_ID, "after the attempts");
}

#[tokio::test]
async fn the_schema_tenant_sees_its_schema_and_not_the_shared_tables() {
    let env = start().await;
    let umbrella = env.connect("umbrella").await;
    assert_eq!(
        names(&umbrella, "SELECT name FROM items").await,
        ["umbrella t-virus"]
    );
    let row = umbrella
        .query_one("SELECT current_schemas(false)::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "{t_umbrella}");
    // Its own role has no rights on the shared tables, whatever the tenant context says.
    let err = umbrella
        .query("SELECT name FROM public.items", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");

    // A shared tenant cannot reach into the schema tenant's schema.
    let acme = env.connect("acme").await;
    let err = acme
        .query("SELECT name FROM t_umbrella.items", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
}

#[tokio::test]
async fn the_dedicated_tenant_reaches_its_own_database() {
    let env = start().await;
    let initech = env.connect("initech").await;
    assert_eq!(
        names(&initech, "SELECT name FROM items").await,
        ["initech TPS report"]
    );
    let db = initech
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap();
    assert_eq!(db.get::<_, String>(0), env.fixture.dedicated_db);
}

#[tokio::test]
async fn psql_sees_only_the_tenants_rows() {
    let env = start().await;
    let (acme_url, globex_url) = (env.url("acme"), env.url("globex"));
    let (acme, globex) = tokio::task::spawn_blocking(move || {
        (
            psql(&acme_url, "SELECT name FROM items ORDER BY id"),
            psql(&globex_url, "SELECT name FROM items ORDER BY id"),
        )
    })
    .await
    .unwrap();
    assert!(acme.0, "psql failed: {}", acme.2);
    assert_eq!(acme.1, "acme anvil\nacme rocket skates\n");
    assert!(globex.0, "psql failed: {}", globex.2);
    assert_eq!(globex.1, "globex doomsday device\n");
}

#[tokio::test]
async fn the_database_may_be_the_tenant_or_its_placement_database() {
    let env = start().await;
    let mut c = env.pg_config("acme");
    c.dbname(&env.fixture.shared_db);
    common::connect_with(c).await.expect("placement database");
    let mut c2 = env.pg_config("acme");
    c2.dbname("nosuchdb");
    let err = common::connect_with(c2).await.unwrap_err();
    assert_eq!(code(&err), "3D000");
    let mut c3 = env.pg_config("acme");
    c3.dbname("globex");
    let err = common::connect_with(c3).await.unwrap_err();
    assert_eq!(code(&err), "28000", "database naming another tenant");
}
