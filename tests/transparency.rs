//! Drivers cannot tell (issue "Drivers cannot tell, part 2"): behaviours of PostgreSQL that
//! transaction pooling must keep: the unnamed prepared statement across round trips, SQL
//! DEALLOCATE of statements prepared with Parse, and PostgreSQL's own syntax errors for text
//! the guard cannot read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use common::raw::Raw;
use common::{Env, code, start_with};
use postgres_protocol::message::frontend;

/// Transaction pooling with two server connections on the shared shard.
async fn two_connections() -> Env {
    start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 2", 1)
    })
    .await
}

/// Sends `out` and returns the messages up to ReadyForQuery.
async fn round_trip(raw: &mut Raw, out: &BytesMut) -> Vec<common::raw::Msg> {
    raw.send(out).await;
    raw.until_ready().await
}

fn errors(msgs: &[common::raw::Msg]) -> Vec<(String, String)> {
    msgs.iter()
        .filter(|m| m.tag == b'E')
        .map(|m| {
            (
                m.sqlstate().unwrap_or_default(),
                m.field(b'M').unwrap_or_default(),
            )
        })
        .collect()
}

fn rows(msgs: &[common::raw::Msg]) -> usize {
    msgs.iter().filter(|m| m.tag == b'D').count()
}

#[tokio::test]
async fn the_unnamed_statement_outlives_its_round_trip() {
    // One server connection, shared with another acme client whose simple queries drop
    // the server's unnamed statement between raw's round trips.
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 1", 1)
    })
    .await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let other = env.connect("acme").await;
    let mut parse = BytesMut::new();
    frontend::parse(
        "",
        "SELECT name FROM items WHERE $1::int > 0",
        [23],
        &mut parse,
    )
    .unwrap();
    frontend::sync(&mut parse);
    assert!(errors(&round_trip(&mut raw, &parse).await).is_empty());
    for round in 0..6 {
        other.simple_query("SELECT 1").await.unwrap();
        // Describe, then Bind/Execute, of the unnamed statement in later round trips.
        let mut out = BytesMut::new();
        frontend::describe(b'S', "", &mut out).unwrap();
        Raw::put_bind_execute_sync(&mut out, "", &["1"]);
        let replies = round_trip(&mut raw, &out).await;
        assert!(
            errors(&replies).is_empty(),
            "round {round}: {:?}",
            errors(&replies)
        );
        assert_eq!(rows(&replies), 2, "round {round}: acme's two rows");
        assert!(
            replies.iter().any(|m| m.tag == b't'),
            "ParameterDescription"
        );
    }
    // As on PostgreSQL, a simple Query drops the unnamed statement.
    raw.query("SELECT 1").await;
    raw.until_ready().await;
    let mut out = BytesMut::new();
    frontend::describe(b'S', "", &mut out).unwrap();
    frontend::sync(&mut out);
    let replies = round_trip(&mut raw, &out).await;
    assert_eq!(
        errors(&replies),
        [(
            "26000".to_owned(),
            "unnamed prepared statement does not exist".to_owned()
        )]
    );
    // A failed unnamed Parse drops the previous one too.
    let mut out = BytesMut::new();
    frontend::parse("", "SELECT 1", [], &mut out).unwrap();
    frontend::sync(&mut out);
    round_trip(&mut raw, &out).await;
    let mut out = BytesMut::new();
    frontend::parse("", "SELECT * FROM no_such_table", [], &mut out).unwrap();
    frontend::sync(&mut out);
    assert_eq!(errors(&round_trip(&mut raw, &out).await)[0].0, "42P01");
    other.simple_query("SELECT 1").await.unwrap();
    let mut out = BytesMut::new();
    frontend::describe(b'S', "", &mut out).unwrap();
    frontend::sync(&mut out);
    assert_eq!(errors(&round_trip(&mut raw, &out).await)[0].0, "26000");
}

/// A client never reaches another client's unnamed statement left on a shared connection.
#[tokio::test]
async fn another_clients_unnamed_statement_is_out_of_reach() {
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 1", 1)
    })
    .await;
    let t = env.tenant("acme");
    let mut a = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let mut b = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let mut parse = BytesMut::new();
    frontend::parse("", "SELECT 'a secret'", [], &mut parse).unwrap();
    frontend::sync(&mut parse);
    assert!(errors(&round_trip(&mut a, &parse).await).is_empty());
    let mut out = BytesMut::new();
    frontend::describe(b'S', "", &mut out).unwrap();
    frontend::sync(&mut out);
    assert_eq!(errors(&round_trip(&mut b, &out).await)[0].0, "26000");
}

#[tokio::test]
async fn sql_deallocate_of_a_parse_prepared_statement_succeeds_anywhere() {
    let env = two_connections().await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let other = env.connect("acme").await;
    for i in 0..4 {
        let mut parse = BytesMut::new();
        frontend::parse(&format!("_pg3_{i}"), "SELECT 1", [], &mut parse).unwrap();
        frontend::sync(&mut parse);
        assert!(errors(&round_trip(&mut raw, &parse).await).is_empty());
    }
    for i in 0..4 {
        other.simple_query("SELECT 1").await.unwrap();
        raw.query(&format!("DEALLOCATE _pg3_{i}")).await;
        let replies = raw.until_ready().await;
        assert!(errors(&replies).is_empty(), "{:?}", errors(&replies));
    }
    // Gone, as on PostgreSQL.
    let mut out = BytesMut::new();
    frontend::describe(b'S', "_pg3_0", &mut out).unwrap();
    frontend::sync(&mut out);
    assert_eq!(errors(&round_trip(&mut raw, &out).await)[0].0, "26000");
}

#[tokio::test]
async fn text_the_guard_cannot_read_gets_postgresqls_syntax_error() {
    let env = two_connections().await;
    for tenant in ["acme", "initech"] {
        let c = env.connect(tenant).await;
        for (sql, message, position) in [
            (
                "SELECT 'abc",
                "unterminated quoted string at or near \"'abc\"",
                8,
            ),
            (
                "SELECT 1; SELECT \"x",
                "unterminated quoted identifier at or near \"\"x\"",
                18,
            ),
            (
                "SELECT /* x",
                "unterminated /* comment at or near \"/* x\"",
                8,
            ),
        ] {
            for prepared in [false, true] {
                let err = if prepared {
                    c.prepare(sql).await.expect_err("refused")
                } else {
                    c.simple_query(sql).await.unwrap_err()
                };
                assert_eq!(code(&err), "42601", "{sql}");
                let db = err.as_db_error().unwrap();
                assert_eq!(db.message(), message, "{sql}");
                assert_eq!(
                    db.position(),
                    Some(&tokio_postgres::error::ErrorPosition::Original(position)),
                    "{sql}"
                );
            }
        }
        // The session goes on.
        c.simple_query("SELECT 1").await.unwrap();
    }
}

/// Logs in with the raw protocol; returns the client and the pid its BackendKeyData gave it.
async fn login_with_pid(env: &Env, tenant: &str) -> (Raw, i32) {
    let t = env.tenant(tenant);
    let mut raw = Raw::startup(env.addr(), &[("user", &format!("app@{tenant}"))]).await;
    raw.authenticate(&t.password).await.expect("authenticated");
    let startup = raw.until_ready().await;
    let key = startup
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes(key.body[..4].try_into().unwrap());
    (raw, pid)
}

/// A notification carries the notifying client's pid, as pgtenant's BackendKeyData gave it
/// (not the pid of whichever pooled backend ran the NOTIFY).
#[tokio::test]
async fn notifications_carry_the_notifying_clients_pid() {
    let env = two_connections().await;
    let (mut listener, listener_pid) = login_with_pid(&env, "acme").await;
    let (mut notifier, notifier_pid) = login_with_pid(&env, "acme").await;
    listener.query("LISTEN ev").await;
    listener.until_ready().await;
    let mut seen = Vec::new();
    for round in 0..3 {
        notifier
            .query(&format!("NOTIFY ev, 'from notifier {round}'"))
            .await;
        notifier.until_ready().await;
        listener
            .query(&format!("NOTIFY ev, 'from listener {round}'"))
            .await;
        seen.extend(listener.until_ready().await);
    }
    let mut got = Vec::new();
    while let Ok(Some(m)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), listener.try_recv()).await
    {
        seen.push(m);
    }
    for m in seen {
        if m.tag == b'A' {
            let pid = i32::from_be_bytes(m.body[..4].try_into().unwrap());
            let payload = String::from_utf8_lossy(&m.body[4..]).into_owned();
            got.push((pid, payload));
        }
    }
    assert_eq!(got.len(), 6, "{got:?}");
    for (pid, payload) in got {
        let want = if payload.contains("from notifier") {
            notifier_pid
        } else {
            listener_pid
        };
        assert_eq!(pid, want, "{payload}");
    }
}

/// Session pooling too: a client's own notification shows its BackendKeyData pid.
#[tokio::test]
async fn in_session_mode_a_clients_own_notification_shows_its_pid() {
    let env = start_with("", |t| {
        t.replacen("mode = \"transaction\"", "mode = \"session\"", 1)
    })
    .await;
    for tenant in ["acme", "initech"] {
        let (mut c, pid) = login_with_pid(&env, tenant).await;
        c.query("LISTEN ev; NOTIFY ev, 'mine'").await;
        let msgs = c.until_ready().await;
        let n = msgs.iter().find(|m| m.tag == b'A').expect("notification");
        assert_eq!(
            i32::from_be_bytes(n.body[..4].try_into().unwrap()),
            pid,
            "{tenant}"
        );
        assert!(String::from_utf8_lossy(&n.body[4..]).starts_with("ev\0"));
    }
}

/// `pg_prepared_statements` shows a client exactly the statements it prepared, under its own
/// names, with their parameter types: never another client's, never pgtenant's own.
#[tokio::test]
async fn pg_prepared_statements_shows_the_clients_own_statements() {
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 1", 1)
    })
    .await;
    let a = env.connect("acme").await;
    let b = env.connect("acme").await;
    let _a1 = a.prepare("SELECT $1::int + 1").await.unwrap();
    let _b1 = b.prepare("SELECT $1::text || 'b'").await.unwrap();
    a.batch_execute("PREPARE q (int8) AS SELECT $1")
        .await
        .unwrap();
    b.batch_execute("PREPARE other AS SELECT 2").await.unwrap();
    let view = "SELECT name, statement, parameter_types::text, from_sql \
                  FROM pg_prepared_statements ORDER BY from_sql, statement";
    let rows = a.simple_query(view).await.unwrap();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..4).map(|i| r.get(i).unwrap_or("").to_owned()).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0][1], "SELECT $1::int + 1");
    assert_eq!(rows[0][2], "{integer}");
    assert_eq!(rows[0][3], "f");
    assert!(!rows[0][0].starts_with("pgt"), "{rows:?}");
    assert_eq!(rows[1][0], "q");
    assert_eq!(rows[1][1], "PREPARE q (int8) AS SELECT $1");
    assert_eq!(rows[1][2], "{bigint}");
    // A named statement that reads the view sees itself there, as on PostgreSQL.
    let counting = a
        .prepare("SELECT count(*) FROM pg_prepared_statements WHERE name <> ''")
        .await
        .unwrap();
    let n: i64 = a.query_one(&counting, &[]).await.unwrap().get(0);
    assert_eq!(n, 3, "two earlier statements and itself");
    // So does one made with SQL PREPARE, run later or in the same text (it counted none of
    // its own: its view was built before it existed).
    a.batch_execute("PREPARE Mine AS SELECT count(*) FROM pg_prepared_statements WHERE name <> ''")
        .await
        .unwrap();
    let first_value = |messages: Vec<tokio_postgres::SimpleQueryMessage>| {
        messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
    };
    let n = first_value(a.simple_query("EXECUTE mine").await.unwrap());
    assert_eq!(
        n.as_deref(),
        Some("4"),
        "three earlier statements and itself"
    );
    let shown = first_value(
        a.simple_query(
            "PREPARE m2 AS SELECT statement FROM pg_prepared_statements WHERE name = 'm2'; \
             EXECUTE m2",
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        shown.as_deref(),
        Some("PREPARE m2 AS SELECT statement FROM pg_prepared_statements WHERE name = 'm2'")
    );
    a.batch_execute("DEALLOCATE mine; DEALLOCATE m2")
        .await
        .unwrap();
    // Each mention of the view gets a copy of it, which holds the client's statements: a
    // short text naming it often made pgtenant build (and send) gigabytes. Now bounded.
    let huge = format!("PREPARE huge AS SELECT '{}'::text", "x".repeat(2 << 20));
    a.batch_execute(&huge).await.unwrap();
    let many = format!(
        "SELECT 1 FROM pg_prepared_statements{}",
        ", pg_prepared_statements".repeat(39)
    );
    let err = a.simple_query(&many).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("54000"), "{err:?}");
    a.batch_execute("DEALLOCATE huge").await.unwrap();
    // The extended protocol, with a parameter and the qualified name, as psycopg reads it.
    let row = b
        .query_one(
            "SELECT parameter_types::text FROM pg_catalog.pg_prepared_statements WHERE name = $1",
            &[&"other"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "{}");
    let n: i64 = b
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements ps WHERE ps.name LIKE 'pgt%' OR ps.statement LIKE '%+ 1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "b sees nothing of a's or pgtenant's");
    // A client that prepared nothing sees an empty view.
    let c = env.connect("acme").await;
    let rows = c
        .simple_query("SELECT * FROM pg_prepared_statements")
        .await
        .unwrap();
    assert!(
        !rows
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    );
    // The view's name where pgtenant also renames a statement or a channel: one token, two
    // rewrites. It ended the session (a panic while rewriting); now it is refused and the
    // session goes on.
    for sql in [
        "LISTEN pg_prepared_statements",
        "EXECUTE pg_prepared_statements",
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{sql}: {e}");
    }
    let rows = c.simple_query("SELECT 1").await.unwrap();
    assert!(
        rows.iter().any(
            |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))
        )
    );
}

/// A client whose connection is pinned (a temporary table) still gets its notifications
/// between its transactions, like any other.
#[tokio::test]
async fn a_pinned_client_receives_its_notifications() {
    let env = two_connections().await;
    let (mut pinned, _) = login_with_pid(&env, "acme").await;
    pinned
        .query("CREATE TEMP TABLE scratch (x int); LISTEN ev")
        .await;
    pinned.until_ready().await;
    let (mut notifier, _) = login_with_pid(&env, "acme").await;
    for i in 0..3 {
        notifier.query(&format!("NOTIFY ev, 'n{i}'")).await;
        notifier.until_ready().await;
    }
    let got = pinned
        .notifications(std::time::Duration::from_secs(2))
        .await;
    assert_eq!(
        got,
        (0..3)
            .map(|i| ("ev".to_owned(), format!("n{i}")))
            .collect::<Vec<_>>()
    );
    // Still pinned: the temporary table is there, and notifications keep coming.
    pinned.query("SELECT count(*) FROM scratch").await;
    assert!(pinned.until_ready().await.iter().all(|m| m.tag != b'E'));
    notifier.query("NOTIFY ev, 'later'").await;
    notifier.until_ready().await;
    let got = pinned
        .notifications(std::time::Duration::from_secs(2))
        .await;
    assert_eq!(got, [("ev".to_owned(), "later".to_owned())]);
}

/// A client's own NOTIFY on a channel it listens to reaches it before its ReadyForQuery, as
/// from PostgreSQL, exactly once (the hub's copy is not shown again); a rolled-back NOTIFY
/// never arrives, and duplicates within a transaction are folded.
#[tokio::test]
async fn a_clients_own_notification_arrives_before_its_ready_for_query() {
    let env = two_connections().await;
    for tenant in ["acme", "initech"] {
        let (mut c, pid) = login_with_pid(&env, tenant).await;
        c.query("LISTEN ev").await;
        c.until_ready().await;
        let own = |msgs: &[common::raw::Msg]| -> Vec<(i32, String)> {
            msgs.iter()
                .filter(|m| m.tag == b'A')
                .map(|m| {
                    (
                        i32::from_be_bytes(m.body[..4].try_into().unwrap()),
                        String::from_utf8_lossy(&m.body[4..]).into_owned(),
                    )
                })
                .collect()
        };
        c.query("NOTIFY ev, 'n1'").await;
        let replies = c.until_ready().await;
        assert_eq!(own(&replies), [(pid, "ev\0n1\0".to_owned())], "{tenant}");
        c.query("BEGIN; NOTIFY ev, 'gone'; ROLLBACK").await;
        assert!(own(&c.until_ready().await).is_empty());
        c.query("BEGIN; NOTIFY ev, 'twice'; NOTIFY ev, 'twice'; NOTIFY ev; COMMIT")
            .await;
        let replies = c.until_ready().await;
        assert_eq!(
            own(&replies),
            [(pid, "ev\0twice\0".to_owned()), (pid, "ev\0\0".to_owned())],
            "{tenant}"
        );
        // Nothing arrives a second time through the hub.
        let later = c.notifications(std::time::Duration::from_secs(1)).await;
        assert!(later.is_empty(), "{tenant}: {later:?}");
    }
}

/// `set_config(..., false)` changes the session as `SET` does: with transaction pooling it
/// follows the client to every server connection (literal or Bind parameters) and never
/// stays behind for another client; inside a transaction that rolls back it is undone.
#[tokio::test]
async fn session_level_set_config_follows_the_client_and_no_one_else() {
    let env = two_connections().await;
    let a = env.connect("acme").await;
    let b = env.connect("acme").await;
    let c = env.connect("acme").await;
    let default: String = b.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    a.query("SELECT set_config($1, $2, false)", &[&"work_mem", &"7MB"])
        .await
        .unwrap();
    c.simple_query("SELECT set_config('work_mem', '77MB', false)")
        .await
        .unwrap();
    c.simple_query("BEGIN; SELECT set_config('lock_timeout', '9s', false); ROLLBACK")
        .await
        .unwrap();
    for round in 0..12 {
        // Two connections, three clients: each round lands the clients on other ones.
        let (ra, rb, rc) = tokio::join!(
            a.query_one("SHOW work_mem", &[]),
            b.query_one("SHOW work_mem", &[]),
            c.query_one(
                "SELECT current_setting('work_mem'), current_setting('lock_timeout')",
                &[]
            ),
        );
        assert_eq!(ra.unwrap().get::<_, String>(0), "7MB", "round {round}");
        assert_eq!(rb.unwrap().get::<_, String>(0), default, "round {round}");
        let rc = rc.unwrap();
        assert_eq!(rc.get::<_, String>(0), "77MB", "round {round}");
        assert_eq!(rc.get::<_, String>(1), "0", "round {round}");
    }
    // NULL resets, as RESET does.
    a.query("SELECT set_config($1, NULL, false)", &[&"work_mem"])
        .await
        .unwrap();
    for _ in 0..4 {
        let (ra, _) = tokio::join!(
            a.query_one("SHOW work_mem", &[]),
            b.simple_query("SELECT 1")
        );
        assert_eq!(ra.unwrap().get::<_, String>(0), default);
    }
}
