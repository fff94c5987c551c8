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

/// `set_config` with Bind parameters is checked with the values the Bind gives: the same
/// walls as for literals, whatever the types, casts or formats around them.
#[tokio::test]
async fn set_config_with_bind_parameters_is_checked_at_bind() {
    use tokio_postgres::types::Type;
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    for (sql, name) in [
        ("SELECT set_config($1, $2, false)", "app.current_tenant_id"),
        (
            "SELECT set_config($1::text, $2, true)",
            "app.current_tenant_id",
        ),
        (
            "select pg_catalog.set_config($1, $2, false)",
            "APP.Current_Tenant_ID",
        ),
        ("SELECT set_config($1, $2, false)", "pgtenant.context"),
        ("SELECT set_config($1, $2, false)", "role"),
        ("SELECT set_config($1, $2, false)", "session_authorization"),
        (
            "SELECT pg_catalog.set_config(name, $2, false) FROM (SELECT $1::text AS name) n",
            "app.current_tenant_id",
        ),
        // $1 typed char(n) by another use would lose its trailing spaces in the call.
        (
            "SELECT $1::char(40), set_config($1, $2, false)",
            "app.current_tenant_id   ",
        ),
    ] {
        let err = acme.query(sql, &[&name, &GLOBEX_ID]).await.unwrap_err();
        assert_eq!(code(&err), "42501", "{sql} with {name}");
    }
    // A declared type whose cast to text changes the value is refused at Parse.
    let err = acme
        .prepare_typed("SELECT set_config($1, 'x', false)", &[Type::BPCHAR])
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    // Values are checked too: the plan's statement timeout is a ceiling, NULL included.
    for (name, value) in [
        ("statement_timeout", Some("0")),
        ("statement_timeout", None),
        ("standard_conforming_strings", Some("off")),
        ("client_encoding", Some("SJIS")),
    ] {
        let err = acme
            .query("SELECT set_config($1, $2, false)", &[&name, &value])
            .await
            .unwrap_err();
        assert_eq!(code(&err), "42501", "{name} = {value:?}");
    }
    // The session goes on, and its own settings are usable with parameters.
    let row = acme
        .query_one(
            "SELECT set_config($1, $2, false)",
            &[&"myapp.user_id", &"42"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "42");
    let row = acme
        .query_one("SELECT current_setting('myapp.user_id')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "42");
    // What the calls change is bounded as a Query's is (1 MiB of names and values): Binds
    // added to it without a check.
    let big = "x".repeat(600 << 10);
    let set = "SELECT set_config($1, $2, false)";
    acme.query(set, &[&"myapp.a", &big]).await.unwrap();
    let err = acme.query(set, &[&"myapp.b", &big]).await.unwrap_err();
    assert_eq!(code(&err), "53400");
    acme.query(set, &[&"myapp.a", &"small"]).await.unwrap();
    acme.query(set, &[&"myapp.b", &big]).await.unwrap();
    assert_isolation_intact(&env, &before, &acme).await;
}

/// A statement calling set_config with parameters cannot be run by SQL `EXECUTE`, which
/// would give it values no Bind check saw (in session mode the names are the server's own).
#[tokio::test]
async fn set_config_statements_cannot_be_run_by_sql_execute() {
    use bytes::BytesMut;
    use common::raw::Raw;
    use postgres_protocol::message::frontend;
    let bind = |values: [&str; 2]| {
        let mut out = BytesMut::new();
        Raw::put_bind_execute_sync(&mut out, "setter", &values);
        out
    };
    let sqlstates = |msgs: &[common::raw::Msg]| {
        msgs.iter()
            .filter(|m| m.tag == b'E')
            .map(|m| m.sqlstate().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    for mode in ["session", "transaction"] {
        let env = common::start_with("", |t| {
            t.replacen("mode = \"transaction\"", &format!("mode = \"{mode}\""), 1)
        })
        .await;
        let before = all_rows(&env);
        let t = env.tenant("acme");
        let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
        let mut out = BytesMut::new();
        frontend::parse("setter", "SELECT set_config($1, $2, false)", [], &mut out).unwrap();
        frontend::sync(&mut out);
        raw.send(&out).await;
        assert!(sqlstates(&raw.until_ready().await).is_empty(), "{mode}");
        for sql in [
            format!("EXECUTE setter('app.current_tenant_id', '{GLOBEX_ID}')"),
            format!("EXPLAIN ANALYZE EXECUTE \"setter\"('app.current_tenant_id', '{GLOBEX_ID}')"),
        ] {
            let mut out = BytesMut::new();
            frontend::query(&sql, &mut out).unwrap();
            raw.send(&out).await;
            assert_eq!(
                sqlstates(&raw.until_ready().await),
                ["42501"],
                "{mode}: {sql}"
            );
        }
        // Bind with the same values is refused; with the client's own setting it runs.
        raw.send(&bind(["app.current_tenant_id", GLOBEX_ID])).await;
        assert_eq!(sqlstates(&raw.until_ready().await), ["42501"], "{mode}");
        raw.send(&bind(["myapp.x", "1"])).await;
        assert!(sqlstates(&raw.until_ready().await).is_empty(), "{mode}");
        let acme = env.connect("acme").await;
        assert_isolation_intact(&env, &before, &acme).await;
    }
}
