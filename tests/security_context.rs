//! The verified tenant context (DESIGN.md §5 S1b) and the guard's closed classes (issue
//! "Tenant context that no SQL can forge"): with the guard switched off the database alone
//! keeps a tenant to its own rows; with it on, each class of forgery is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::raw::Raw;
use common::{
    Env, all_rows, assert_all_refused, assert_isolation_intact, code, sqlstate_of, start,
    start_tweaked,
};
use pgtenant::demo::{ACME_ID, GLOBEX_ID};
use postgres_protocol::message::frontend;

fn session_mode(text: String) -> String {
    text.replace("mode = \"transaction\"", "mode = \"session\"")
}

async fn unguarded(session: bool) -> Env {
    start_tweaked(
        "",
        |t| if session { session_mode(t) } else { t },
        |s| s.unguarded_for_tests = true,
    )
    .await
}

async fn names(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .simple_query("SELECT name FROM items ORDER BY id")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// Every way of writing the unverified setting, or the token setting, leaves a tenant with
/// its own rows only, with no guard in front of the database.
#[tokio::test]
async fn without_the_guard_the_database_still_shows_only_the_tenants_own_rows() {
    for session in [false, true] {
        let env = unguarded(session).await;
        let before = all_rows(&env);
        let acme = env.connect("acme").await;
        let own = names(&acme).await;
        assert_eq!(own, ["acme anvil", "acme rocket skates"]);
        let g = GLOBEX_ID;
        // The guard really is off: these reach the server and succeed.
        acme.simple_query(&format!(
            "SELECT set_config('app.current_tenant_id', '{g}', false)"
        ))
        .await
        .unwrap();
        assert_eq!(
            names(&acme).await,
            own,
            "session={session}: after set_config"
        );
        acme.simple_query(&format!("SET app.current_tenant_id = '{g}'"))
            .await
            .unwrap();
        assert_eq!(names(&acme).await, own, "session={session}: after SET");
        // In one statement, and inside a transaction.
        let rows = acme
            .simple_query(&format!(
                "BEGIN; SELECT set_config('app.current_tenant_id', '{g}', true); \
                 SELECT name FROM items; COMMIT"
            ))
            .await
            .unwrap();
        let seen: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .filter(|n| !n.contains('-'))
            .collect();
        assert!(
            seen.iter().all(|n| n.starts_with("acme")),
            "session={session}: {seen:?}"
        );
        // A token forged from the tenant's own: another tenant's id under acme's MAC.
        let token: String = acme
            .query_one("SELECT current_setting('pgtenant.context')", &[])
            .await
            .unwrap()
            .get(0);
        assert!(token.starts_with(ACME_ID), "{token}");
        let forged = token.replacen(ACME_ID, g, 1);
        let rows = acme
            .simple_query(&format!(
                "SELECT set_config('pgtenant.context', '{forged}', false), \
                        (SELECT count(*) FROM items), pgtenant.tenant_id()"
            ))
            .await
            .unwrap();
        let Some(r) = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        }) else {
            panic!("no row")
        };
        assert_eq!(r.get(1), Some("0"), "a forged token shows nothing");
        assert_eq!(r.get(2), None, "and verifies as no tenant");
        // Writes into another tenant are refused by the policy's WITH CHECK.
        let err = acme
            .simple_query(&format!(
                "INSERT INTO items (tenant_id, name) VALUES ('{g}', 'planted')"
            ))
            .await
            .unwrap_err();
        assert_eq!(code(&err), "42501");
        // The key is out of reach, and so are other sessions' activity and locks.
        for sql in [
            "SELECT * FROM pgtenant.context_key",
            "SELECT query FROM pg_stat_activity",
            "SELECT count(*) FROM pg_lock_status()",
            "SELECT table_to_xml('pg_catalog.pg_stat_activity', true, false, '')",
        ] {
            let err = acme.simple_query(sql).await.unwrap_err();
            assert_eq!(code(&err), "42501", "session={session}: {sql}");
        }
        drop(acme);
        assert_eq!(all_rows(&env), before);
        // A fresh connection of the tenant is bound properly again.
        let acme = env.connect("acme").await;
        assert_eq!(names(&acme).await, own);
    }
}

/// Class 1: settings that change how text is lexed cannot be changed, at startup or later.
#[tokio::test]
async fn lexing_settings_cannot_be_changed() {
    let env = start().await;
    let t = env.tenant("acme").clone();
    for params in [
        [("standard_conforming_strings", "off")],
        [("options", "-c standard_conforming_strings=off")],
        [("client_encoding", "SJIS")],
        [("options", "-c backslash_quote=on")],
    ] {
        let mut p = vec![("user", "app@acme")];
        p.extend(params);
        let mut raw = Raw::startup(env.addr(), &p).await;
        let refused = match raw.authenticate(&t.password).await {
            Err(m) => Some(m),
            Ok(()) => {
                let mut found = None;
                while let Some(m) = raw.try_recv().await {
                    if m.tag == b'E' {
                        found = Some(m);
                        break;
                    }
                    if m.tag == b'Z' {
                        break;
                    }
                }
                found
            }
        };
        let code = refused.and_then(|m| m.sqlstate());
        assert!(
            matches!(code.as_deref(), Some("42501" | "08P01")),
            "{params:?}: {code:?}"
        );
    }
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    assert_all_refused(
        &acme,
        &[
            "SET standard_conforming_strings = off",
            "SET standard_conforming_strings TO 'off'",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SET client_encoding = 'SJIS'",
            "SET NAMES 'BIG5'",
            "SELECT set_config('client_encoding', 'GBK', false)",
            "SET backslash_quote = on",
        ],
    )
    .await;
    // Pipelined in one write with a query that hides set_config in a string for the guard if
    // the setting changed first: the SET is refused, so the query is lexed as the server does.
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let mut out = BytesMut::new();
    frontend::query("SET standard_conforming_strings = off", &mut out).unwrap();
    frontend::query(
        &format!(
            "SELECT 'a\\'; SELECT set_config('app.current_tenant_id', '{GLOBEX_ID}', false); --'"
        ),
        &mut out,
    )
    .unwrap();
    raw.send(&out).await;
    let first = raw.until_ready().await;
    assert!(
        first
            .iter()
            .any(|m| m.sqlstate().as_deref() == Some("42501"))
    );
    // The server reads 'a\' as a whole string (standard-conforming), so set_config is code:
    // the guard reads it the same way and refuses it.
    let second = raw.until_ready().await;
    assert!(
        second
            .iter()
            .any(|m| m.sqlstate().as_deref() == Some("42501"))
    );
    // A bit string ends at its first quote: what follows is code for the server, and so for
    // the guard (found by tests/guard_differential.rs).
    let bits =
        format!("SELECT x''; SELECT set_config('app.current_tenant_id', '{GLOBEX_ID}', false) --'");
    assert_eq!(sqlstate_of(&acme, &bits).await.as_deref(), Some("42501"));
    // Allowed values still work.
    acme.simple_query("SET standard_conforming_strings = on; SET client_encoding = 'UTF8'")
        .await
        .unwrap();
    assert_isolation_intact(&env, &before, &acme).await;
}

/// Class 2: pg_settings cannot be written.
#[tokio::test]
async fn pg_settings_cannot_be_written() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    assert_all_refused(
        &acme,
        &[
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
            "UPDATE pg_catalog.pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding'",
            "update \"pg_settings\" set setting = '0' where name = 'statement_timeout'",
            "WITH x AS (UPDATE pg_settings SET setting = 'public' WHERE name = 'search_path' RETURNING 1) SELECT * FROM x",
            "INSERT INTO pg_settings (name, setting) VALUES ('statement_timeout', '0')",
            // Spellings the guard's name gate must see as the write and the view they are.
            "UPDATE PG_SETTINGS SET setting = '0' WHERE name = 'statement_timeout'",
            "UPDATE U&\"pg\\005fsettings\" SET setting = '0' WHERE name = 'statement_timeout'",
            "SELECT 1; Update pg_settings SET setting = '0' WHERE name = 'statement_timeout'",
        ],
    )
    .await;
    let umbrella = env.connect("umbrella").await;
    assert_eq!(
        sqlstate_of(
            &umbrella,
            "UPDATE pg_settings SET setting = 'public' WHERE name = 'search_path'"
        )
        .await
        .as_deref(),
        Some("42501")
    );
    let initech = env.connect("initech").await;
    assert_eq!(
        sqlstate_of(
            &initech,
            "UPDATE pg_settings SET setting = '0' WHERE name = 'statement_timeout'"
        )
        .await
        .as_deref(),
        Some("42501"),
        "dedicated placements too"
    );
    assert_isolation_intact(&env, &before, &acme).await;
}

/// Class 3: settings replayed on another server connection are values, never SQL text.
#[tokio::test]
async fn replayed_settings_are_values_not_sql() {
    // One server connection for the shard: every transaction of every client shares it, so
    // each switch between the two clients replays the other's settings.
    let env = common::start_with("", |t| {
        t.replace("max_connections = 60", "max_connections = 1")
    })
    .await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    // Under 64 bytes (application_name's limit), with every quoting trick the old textual
    // replay would have re-lexed.
    let evil = "x'); SELECT set_config('app.x', 'y', false); --\\'$$".to_owned();
    acme.simple_query(&format!(
        "SET application_name = '{}'",
        evil.replace('\'', "''")
    ))
    .await
    .unwrap();
    let other = env.connect("acme").await;
    other.simple_query("SET work_mem = '5MB'").await.unwrap();
    for _ in 0..3 {
        let shown: String = acme
            .query_one("SHOW application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(shown, evil);
        let wm: String = other.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(wm, "5MB");
    }
    assert_isolation_intact(&env, &before, &acme).await;
}

/// Class 4: pgtenant's own statements (and other clients') cannot be reached by name.
#[tokio::test]
async fn statements_a_client_did_not_create_cannot_be_reached() {
    for session in [false, true] {
        let env = common::start_with("", |t| if session { session_mode(t) } else { t }).await;
        let before = all_rows(&env);
        let acme = env.connect("acme").await;
        acme.simple_query("SELECT 1").await.unwrap();
        let g = GLOBEX_ID;
        for name in ["pgt_bind1", "pgt_bind3", "pgtenant_set", "pgt_bind4"] {
            for sql in [
                format!("EXECUTE {name}('{g}', 'x')"),
                format!("EXPLAIN ANALYZE EXECUTE {name}('{g}', 'x')"),
                format!("CREATE TEMP TABLE t AS EXECUTE {name}('{g}', 'x')"),
                format!("DEALLOCATE {name}"),
            ] {
                let state = sqlstate_of(&acme, &sql).await;
                assert!(
                    matches!(state.as_deref(), Some("26000" | "42501")),
                    "session={session}: {sql}: {state:?}"
                );
            }
        }
        // Over the protocol: Bind and Describe of a name the client never prepared.
        let t = env.tenant("acme").clone();
        let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
        for name in ["pgt_bind3", "pgt_bind1", "pgtenant_set", "nosuch"] {
            let mut out = BytesMut::new();
            frontend::bind(
                "",
                name,
                std::iter::empty::<i16>(),
                [g, "x"],
                |v, buf| {
                    buf.extend_from_slice(v.as_bytes());
                    Ok(postgres_protocol::IsNull::No)
                },
                std::iter::empty::<i16>(),
                &mut out,
            )
            .map_err(|_| "bind")
            .unwrap();
            frontend::execute("", 0, &mut out).unwrap();
            frontend::describe(b'S', name, &mut out).unwrap();
            frontend::sync(&mut out);
            raw.send(&out).await;
            let replies = raw.until_ready().await;
            let error = replies.iter().find(|m| m.tag == b'E').expect("an error");
            assert_eq!(error.sqlstate().as_deref(), Some("26000"), "{name}");
            assert_eq!(
                error.field(b'M').unwrap(),
                format!("prepared statement \"{name}\" does not exist")
            );
        }
        assert_isolation_intact(&env, &before, &acme).await;
    }
}

/// Class 5: a server connection whose reset fails is closed, and the next tenant's
/// transaction runs on a fresh one (never after a failed reset).
#[tokio::test]
async fn a_failed_reset_closes_the_connection_and_retries() {
    let env = common::start_with("", |t| {
        t.replace("max_connections = 60", "max_connections = 1")
    })
    .await;
    let acme = env.connect("acme").await;
    // Enough temporary tables make DISCARD ALL overrun a 1 ms statement timeout.
    let mut sql = String::from("BEGIN; CREATE TEMP TABLE secret (x text); ");
    for i in 0..800 {
        sql.push_str(&format!("CREATE TEMP TABLE pad{i} (x int); "));
    }
    sql.push_str("INSERT INTO secret VALUES ('acme secret'); COMMIT; SET statement_timeout = 1");
    acme.simple_query(&sql).await.unwrap();
    let pid: i32 = acme
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The temporary tables pin acme's connection: it is reset when acme leaves.
    drop(acme);
    let globex = env.connect("globex").await;
    for _ in 0..3 {
        let err = globex
            .simple_query("SELECT x FROM pg_temp.secret")
            .await
            .unwrap_err();
        assert_eq!(
            code(&err),
            "42P01",
            "the previous tenant's temp table is gone"
        );
        assert_eq!(names(&globex).await, ["globex doomsday device"]);
    }
    // The reset failed, so that backend was closed rather than reused.
    let query = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    let mut alive = String::new();
    for _ in 0..50 {
        alive = env.admin_a(&query);
        if alive.trim() == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alive.trim(), "0", "backend {pid} is still there");
}

/// Extras: a schema tenant's search_path is refused (not silently undone); a dedicated
/// tenant's set_config of the tenant setting is refused like SET.
#[tokio::test]
async fn protected_settings_are_refused_in_every_placement() {
    let env = start().await;
    let umbrella = env.connect("umbrella").await;
    assert_all_refused(
        &umbrella,
        &[
            "SET search_path = public",
            "SET search_path TO t_umbrella, public",
            "SELECT set_config('search_path', 'public', false)",
        ],
    )
    .await;
    let initech = env.connect("initech").await;
    for sql in [
        format!("SELECT set_config('app.current_tenant_id', '{GLOBEX_ID}', false)"),
        "SELECT set_config('pgtenant.context', 'x', false)".to_owned(),
    ] {
        assert_eq!(
            sqlstate_of(&initech, &sql).await.as_deref(),
            Some("42501"),
            "{sql}"
        );
    }
    // Role and database defaults reach every session of the login role on the cluster.
    assert_eq!(
        sqlstate_of(
            &initech,
            &format!("ALTER ROLE CURRENT_USER SET app.current_tenant_id = '{GLOBEX_ID}'")
        )
        .await
        .as_deref(),
        Some("42501")
    );
    // The token setting through a prepared statement, and at startup.
    let acme = env.connect("acme").await;
    assert_eq!(
        sqlstate_of(
            &acme,
            "PREPARE p AS SELECT pg_catalog.set_config('pgtenant.context', $1, false)"
        )
        .await
        .as_deref(),
        Some("42501")
    );
    let t = env.tenant("acme").clone();
    let mut raw = Raw::startup(
        env.addr(),
        &[("user", "app@acme"), ("options", "-c pgtenant.context=x")],
    )
    .await;
    let refused = match raw.authenticate(&t.password).await {
        Err(m) => m.sqlstate(),
        Ok(()) => raw
            .until_ready()
            .await
            .iter()
            .find(|m| m.tag == b'E')
            .and_then(|m| m.sqlstate()),
    };
    assert_eq!(refused.as_deref(), Some("42501"));
}

/// Class 6: catalog functions that read other sessions' activity and locks.
#[tokio::test]
async fn catalog_functions_behind_denied_views_are_refused() {
    let env = start().await;
    let acme = env.connect("acme").await;
    assert_all_refused(
        &acme,
        &[
            "SELECT table_to_xml('pg_catalog.pg_stat_activity', true, false, '')",
            "SELECT table_to_xmlschema('pg_stat_activity', true, false, '')",
            "SELECT schema_to_xml('pg_catalog', true, false, '')",
            "SELECT database_to_xml(true, false, '')",
            "SELECT * FROM pg_lock_status()",
            "SELECT * FROM pg_catalog.pg_prepared_xact()",
            "SELECT * FROM pg_stat_progress_vacuum",
        ],
    )
    .await;
}

/// A connection set up for one tenant's new session, and returned before its first
/// transaction, is reset and gets a token of its own for the next tenant.
#[tokio::test]
async fn a_connection_handed_over_right_after_setup_carries_no_foreign_token() {
    let env = common::start_with("", |t| {
        t.replace("max_connections = 60", "max_connections = 1")
    })
    .await;
    for round in 0..5 {
        let acme = env.connect("acme").await;
        let globex = env.connect("globex").await;
        let row = globex
            .query_one(
                "SELECT count(*), pgtenant.tenant_id()::text FROM items",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1, "round {round}");
        assert_eq!(row.get::<_, String>(1), GLOBEX_ID, "round {round}");
        assert_eq!(names(&acme).await, ["acme anvil", "acme rocket skates"]);
    }
}
