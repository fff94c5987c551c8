//! Transaction pooling against real PostgreSQL: many clients over few server connections,
//! with settings, named prepared statements (protocol and SQL), cancel, pipelines and
//! abandoned transactions behaving as on a direct connection, and nothing crossing tenants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Env, code, start_with};
use pgtenant::demo::{ACME_ID, GLOBEX_ID};

/// Transaction pooling with `max` server connections on the shared shard.
async fn pooled(max: usize) -> Env {
    start_with("", move |t| {
        t.replacen("mode = \"session\"", "mode = \"transaction\"", 1)
            .replacen(
                "max_connections = 60",
                &format!("max_connections = {max}"),
                1,
            )
    })
    .await
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_few_server_connections() {
    let env = pooled(3).await;
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push((
            i,
            env.connect(if i % 2 == 0 { "acme" } else { "globex" })
                .await,
        ));
    }
    let mut pids = std::collections::HashSet::new();
    for round in 0..3 {
        let work = clients.iter().map(|(i, c)| async move {
            let row = c
                .query_one(
                    "SELECT current_setting('app.current_tenant_id'), count(*)::int, pg_backend_pid() FROM items",
                    &[],
                )
                .await
                .unwrap();
            (*i, row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, i32>(2))
        });
        for (i, tenant, n, pid) in futures_util::future::join_all(work).await {
            let (want_tenant, want_n) = if i % 2 == 0 {
                (ACME_ID, 2)
            } else {
                (GLOBEX_ID, 1)
            };
            assert_eq!(
                (tenant.as_str(), n),
                (want_tenant, want_n),
                "client {i} round {round}"
            );
            pids.insert(pid);
        }
    }
    assert!(
        pids.len() <= 3,
        "30 clients used {} server connections",
        pids.len()
    );
}

#[tokio::test]
async fn settings_follow_the_client_across_server_connections() {
    let env = pooled(2).await;
    let a = env.connect("acme").await;
    let b = env.connect("acme").await;
    a.simple_query("SET work_mem = '7MB'").await.unwrap();
    a.simple_query("SET application_name = 'client-a'")
        .await
        .unwrap();
    b.simple_query("SET work_mem = '9MB'").await.unwrap();
    for _ in 0..5 {
        // Both clients keep hopping between the two connections.
        let (ra, rb) = tokio::join!(
            a.query_one(
                "SELECT current_setting('work_mem'), current_setting('application_name')",
                &[]
            ),
            b.query_one(
                "SELECT current_setting('work_mem'), current_setting('application_name')",
                &[]
            )
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.get::<_, String>(0), "7MB");
        assert_eq!(ra.get::<_, String>(1), "client-a");
        assert_eq!(rb.get::<_, String>(0), "9MB");
        assert_ne!(rb.get::<_, String>(1), "client-a");
    }
    a.simple_query("RESET work_mem").await.unwrap();
    let row = a.query_one("SHOW work_mem", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB");
    // Rolled back SET LOCAL does not stick; a SET in a committed transaction does.
    a.simple_query("BEGIN; SET LOCAL work_mem = '1MB'; COMMIT")
        .await
        .unwrap();
    let row = a.query_one("SHOW work_mem", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB");
}

/// Checkout prefers the tenant's connection with the client's session state (nothing to
/// replay), and among those the one released last, as PgBouncer does: the same few server
/// processes serve a partial load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_prefers_the_clients_session_state_then_the_connection_released_last() {
    let env = pooled(3).await;
    let (a, b, c) = tokio::join!(
        env.connect("acme"),
        env.connect("acme"),
        env.connect("acme")
    );
    c.simple_query("SET work_mem = '9MB'").await.unwrap();
    // a and b hold one connection each; a's is released first, b's last.
    a.simple_query("BEGIN").await.unwrap();
    let first = backend_pid(&a).await;
    b.simple_query("BEGIN").await.unwrap();
    let last = backend_pid(&b).await;
    assert_ne!(first, last);
    a.simple_query("COMMIT").await.unwrap();
    b.simple_query("COMMIT").await.unwrap();
    assert_eq!(backend_pid(&a).await, last, "the connection released last");
    // Released last now: c's, in c's session state; a gets the one in its own.
    a.simple_query("BEGIN").await.unwrap();
    let own = backend_pid(&a).await;
    c.simple_query("BEGIN").await.unwrap();
    let other = backend_pid(&c).await;
    a.simple_query("COMMIT").await.unwrap();
    c.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        backend_pid(&a).await,
        own,
        "the connection in the client's state"
    );
    assert_ne!(own, other);
    let row = c.query_one("SHOW work_mem", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "9MB");
}

/// Drivers such as pgjdbc and psycopg send SET with Parse/Bind/Execute, not a simple Query.
#[tokio::test]
async fn settings_made_with_the_extended_protocol_follow_the_client() {
    // One server connection: the clients take turns on it.
    let env = pooled(1).await;
    let a = env.connect("acme").await;
    let b = env.connect("acme").await;
    // A named statement prepared in one transaction and executed in later ones.
    let set = a.prepare("SET work_mem = '1234kB'").await.unwrap();
    a.execute(&set, &[]).await.unwrap();
    b.execute("SET work_mem = '2345kB'", &[]).await.unwrap();
    // Prepared but never executed: no effect.
    let _unused = b.prepare("SET work_mem = '64MB'").await.unwrap();
    for _ in 0..5 {
        let (ra, rb) = tokio::join!(
            a.query_one("SELECT current_setting('work_mem')", &[]),
            b.query_one("SELECT current_setting('work_mem')", &[])
        );
        assert_eq!(ra.unwrap().get::<_, String>(0), "1234kB");
        assert_eq!(rb.unwrap().get::<_, String>(0), "2345kB");
    }
    // A failed batch changes nothing.
    let failed = a.execute("SET work_mem = 'lots'", &[]).await.unwrap_err();
    assert_eq!(code(&failed), "22023");
    b.execute("RESET work_mem", &[]).await.unwrap();
    let (ra, rb) = tokio::join!(
        a.query_one("SHOW work_mem", &[]),
        b.query_one("SHOW work_mem", &[])
    );
    assert_eq!(ra.unwrap().get::<_, String>(0), "1234kB");
    assert_eq!(rb.unwrap().get::<_, String>(0), "4MB");
}

#[tokio::test]
async fn named_prepared_statements_work_on_any_server_connection() {
    let env = pooled(2).await;
    let a = env.connect("acme").await;
    let other = env.connect("globex").await;
    let stmt = a
        .prepare("SELECT name, current_setting('app.current_tenant_id') FROM items WHERE id > $1 ORDER BY id")
        .await
        .unwrap();
    let mut pids = std::collections::HashSet::new();
    for _ in 0..10 {
        // The other tenant takes connections in between: a's statement must be re-created.
        other.simple_query("SELECT 1").await.unwrap();
        let (rows, pid) = tokio::join!(a.query(&stmt, &[&0i64]), backend_pid(&other));
        let rows = rows.unwrap();
        pids.insert(pid);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].get::<_, String>(1), ACME_ID);
    }
    // The same text prepared twice by one client shares a server statement.
    let again = a
        .prepare("SELECT name, current_setting('app.current_tenant_id') FROM items WHERE id > $1 ORDER BY id")
        .await
        .unwrap();
    assert_eq!(a.query(&again, &[&0i64]).await.unwrap().len(), 2);
    drop(stmt);
    assert_eq!(a.query(&again, &[&0i64]).await.unwrap().len(), 2);
}

#[tokio::test]
async fn sql_prepare_execute_and_deallocate_behave_as_on_postgres() {
    let env = pooled(2).await;
    let a = env.connect("acme").await;
    let b = env.connect("globex").await;
    a.simple_query("PREPARE byid (bigint) AS SELECT name FROM items WHERE id = $1")
        .await
        .unwrap();
    for _ in 0..4 {
        b.simple_query("SELECT 1").await.unwrap();
        let rows = a.simple_query("EXECUTE byid(1)").await.unwrap();
        let names: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["acme anvil"]);
    }
    // Preparing the same name twice fails, as on PostgreSQL.
    let err = a
        .simple_query("PREPARE byid AS SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42P05");
    a.simple_query("DEALLOCATE byid").await.unwrap();
    let err = a.simple_query("EXECUTE byid(1)").await.unwrap_err();
    assert_eq!(code(&err), "26000");
    a.simple_query("PREPARE byid AS SELECT 2").await.unwrap();
    a.simple_query("DEALLOCATE ALL").await.unwrap();
    assert_eq!(
        code(&a.simple_query("EXECUTE byid").await.unwrap_err()),
        "26000"
    );
    // What pgtenant keeps of them (its text to create them again, and the client's for its
    // view) counts against the session's 16 MiB of statement text; it was unbounded but for
    // the count, so one client could make pgtenant hold 10,000 texts of 64 MiB.
    let big = |n: u8| format!("PREPARE big{n} AS SELECT '{}'::text", "x".repeat(3 << 20));
    a.simple_query(&big(1)).await.unwrap();
    a.simple_query(&big(2)).await.unwrap();
    let err = a.simple_query(&big(3)).await.unwrap_err();
    assert_eq!(code(&err), "53400", "{err}");
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("16 MiB"), "{message}");
    a.simple_query("DEALLOCATE big1").await.unwrap();
    a.simple_query(&big(3)).await.unwrap();
    let rows = a.simple_query("EXECUTE big3").await.unwrap();
    let len = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::len),
        _ => None,
    });
    assert_eq!(len, Some(3 << 20));
}

#[tokio::test]
async fn a_tenant_switch_resets_the_server_connection() {
    let env = pooled(1).await;
    let a = env.connect("acme").await;
    // State that does not pin the connection (temporary tables and the like do: see
    // security_state.rs): settings and prepared statements.
    a.simple_query("SET work_mem = '7MB'; PREPARE planted AS SELECT 1")
        .await
        .unwrap();
    let pid_a = backend_pid(&a).await;
    let b = env.connect("globex").await;
    let row = b
        .query_one(
            "SELECT pg_backend_pid(), current_setting('work_mem'), \
                    (SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '%planted%'), \
                    current_setting('app.current_tenant_id')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid_a, "the same server connection");
    assert_eq!(row.get::<_, String>(1), "4MB");
    assert_eq!(row.get::<_, i64>(2), 0);
    assert_eq!(row.get::<_, String>(3), GLOBEX_ID);
    // acme's own state follows it back.
    let row = a.query_one("SHOW work_mem", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "7MB");
    a.batch_execute("EXECUTE planted").await.unwrap();
}

#[tokio::test]
async fn cancel_reaches_the_connection_serving_the_client_now() {
    let env = pooled(2).await;
    let a = env.connect("acme").await;
    let token = a.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let err = a.simple_query("SELECT pg_sleep(60)").await.unwrap_err();
    assert_eq!(code(&err), "57014");
    // A failure-only limit: the statement was cancelled, not run to its end.
    assert!(started.elapsed() < Duration::from_secs(30));
    canceller.await.unwrap();
    // Cancelling an idle client (no connection) does nothing.
    a.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    a.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_client_leaving_mid_transaction_frees_a_clean_connection() {
    let env = pooled(1).await;
    let t = env.tenant("acme").clone();
    let mut raw = common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.query("BEGIN; INSERT INTO items (name) VALUES ('never committed')")
        .await;
    raw.until_ready().await;
    drop(raw);
    let c = env.connect("acme").await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM items WHERE name = 'never committed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let row = c
        .query_one("SELECT txid_current_if_assigned() IS NULL", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

#[tokio::test]
async fn pipelined_batches_with_an_error_in_the_middle_behave_as_on_postgres() {
    let env = pooled(2).await;
    let c = env.connect("acme").await;
    let (r1, r2, r3) = tokio::join!(
        c.query_one("SELECT 1::int", &[]),
        c.query_one("SELECT 1/0", &[]),
        c.query_one("SELECT 3::int", &[])
    );
    assert_eq!(r1.unwrap().get::<_, i32>(0), 1);
    assert_eq!(code(&r2.unwrap_err()), "22012");
    assert_eq!(r3.unwrap().get::<_, i32>(0), 3);
    // Transactions hold their connection to the end.
    c.simple_query("BEGIN").await.unwrap();
    let p1 = backend_pid(&c).await;
    let other = env.connect("globex").await;
    let p_other = backend_pid(&other).await;
    let p2 = backend_pid(&c).await;
    assert_eq!(p1, p2);
    assert_ne!(p1, p_other);
    c.simple_query("COMMIT").await.unwrap();
}

#[tokio::test]
async fn listen_notify_fans_out_per_tenant() {
    let env = pooled(2).await;
    let t = env.tenant("acme").clone();
    let mut listener =
        common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    listener.query("LISTEN events").await;
    listener.until_ready().await;
    // The pooled connections themselves do not stay listening.
    let probe = env.connect("acme").await;
    let n: i64 = probe
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    let globex = env.connect("globex").await;
    globex
        .simple_query("NOTIFY events, 'from globex'")
        .await
        .unwrap();
    let acme = env.connect("acme").await;
    acme.simple_query("NOTIFY events, 'one'").await.unwrap();
    acme.simple_query("BEGIN; SELECT pg_notify('events', 'two'); COMMIT")
        .await
        .unwrap();
    let got = listener.notifications(Duration::from_millis(700)).await;
    assert_eq!(
        got,
        vec![
            ("events".to_owned(), "one".to_owned()),
            ("events".to_owned(), "two".to_owned())
        ]
    );
    listener.query("UNLISTEN *").await;
    listener.until_ready().await;
    acme.simple_query("NOTIFY events, 'after unlisten'")
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), listener.try_recv())
            .await
            .is_err()
    );
}

/// pgjdbc sends LISTEN and NOTIFY with Parse/Bind/Execute; they work as with a simple Query.
#[tokio::test]
async fn listen_and_notify_through_the_extended_protocol() {
    let env = pooled(2).await;
    let t = env.tenant("acme").clone();
    let mut listener =
        common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let mut batch = bytes::BytesMut::new();
    postgres_protocol::message::frontend::parse("", "LISTEN events", [], &mut batch).unwrap();
    postgres_protocol::message::frontend::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        std::iter::empty::<Option<&[u8]>>(),
        |v, buf| {
            buf.extend_from_slice(v.unwrap_or_default());
            Ok(postgres_protocol::IsNull::No)
        },
        std::iter::empty::<i16>(),
        &mut batch,
    )
    .map_err(|_| "bind")
    .unwrap();
    postgres_protocol::message::frontend::execute("", 0, &mut batch).unwrap();
    postgres_protocol::message::frontend::sync(&mut batch);
    listener.send(&batch).await;
    let replies = listener.until_ready().await;
    assert!(replies.iter().all(|m| m.tag != b'E'), "LISTEN failed");
    let probe = env.connect("acme").await;
    let n: i64 = probe
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the pooled connection stayed listening");

    let globex = env.connect("globex").await;
    globex
        .execute("NOTIFY events, 'from globex'", &[])
        .await
        .unwrap();
    probe.execute("NOTIFY events, 'ext'", &[]).await.unwrap();
    let got = listener.notifications(Duration::from_millis(700)).await;
    assert_eq!(got, vec![("events".to_owned(), "ext".to_owned())]);
}

/// As on PostgreSQL, a NOTIFY committed after LISTEN returned is delivered, even when that
/// LISTEN is the first one and pgtenant's listening connection has yet to be opened.
#[tokio::test]
async fn a_notify_right_after_listen_returns_is_delivered() {
    let env = pooled(2).await;
    let t = env.tenant("acme").clone();
    let sender = env.connect("acme").await;
    let mut listener =
        common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    for round in 0..3 {
        listener.query(&format!("LISTEN ch{round}")).await;
        listener.until_ready().await;
        sender
            .batch_execute(&format!("NOTIFY ch{round}, 'now'"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match listener.try_recv().await {
                    Some(m) if m.tag == b'A' => return Some(m),
                    Some(_) => continue,
                    None => return None,
                }
            }
        })
        .await;
        let m = got
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("round {round}: no notification"));
        assert!(String::from_utf8_lossy(&m.body[4..]).starts_with(&format!("ch{round}\0now")));
    }
}

/// A SET inside a transaction that rolls back is undone by PostgreSQL; pgtenant does not
/// replay it on the client's next server connection. Savepoints are followed the same way.
#[tokio::test]
async fn settings_of_a_rolled_back_transaction_are_not_replayed() {
    let env = pooled(2).await;
    let a = env.connect("acme").await;
    let b = env.connect("acme").await;
    // `b` keeps taking connections so that `a` lands on either one.
    async fn show(c: &tokio_postgres::Client) -> (String, String) {
        let row = c
            .query_one(
                "SELECT current_setting('work_mem'), current_setting('application_name')",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, String>(1))
    }
    let hop = || async {
        for _ in 0..3 {
            b.simple_query("SELECT 1").await.unwrap();
        }
    };
    let base = show(&a).await.1;
    let cases: &[(&str, (&str, &str))] = &[
        ("BEGIN; SET work_mem = '7MB'; ROLLBACK", ("4MB", "")),
        ("BEGIN; SET work_mem = '7MB'; SELECT 1/0", ("4MB", "")),
        ("BEGIN; SET work_mem = '6MB'; COMMIT", ("6MB", "")),
        (
            "BEGIN; SET application_name = 'kept'; SAVEPOINT s; SET work_mem = '9MB'; \
             ROLLBACK TO SAVEPOINT s; COMMIT",
            ("6MB", "kept"),
        ),
        (
            "BEGIN; SAVEPOINT s; SET work_mem = '9MB'; RELEASE s; COMMIT",
            ("9MB", "kept"),
        ),
        ("BEGIN; RESET ALL; ABORT", ("9MB", "kept")),
        (
            "BEGIN; SET work_mem = '5MB'; COMMIT AND CHAIN; SET work_mem = '8MB'; ROLLBACK",
            ("5MB", "kept"),
        ),
    ];
    for (sql, want) in cases {
        // Errors are part of some cases; the session goes on.
        let _ = a.batch_execute(sql).await;
        let _ = a.batch_execute("ROLLBACK").await;
        hop().await;
        let want = (want.0, if want.1.is_empty() { &base } else { want.1 });
        let got = show(&a).await;
        assert_eq!((got.0.as_str(), got.1.as_str()), want, "{sql}");
        hop().await;
        let got = show(&a).await;
        assert_eq!((got.0.as_str(), got.1.as_str()), want, "{sql} (again)");
    }
    // Across round trips: the transaction spans several statements and fails in the middle.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET work_mem = '3MB'").await.unwrap();
    assert!(a.batch_execute("SELECT 1/0").await.is_err());
    a.batch_execute("COMMIT").await.unwrap();
    hop().await;
    assert_eq!(show(&a).await.0, "5MB");
}

/// The plan's statement_timeout is a ceiling: RESET, SET ... TO DEFAULT and RESET ALL return
/// to it, never to the server's default, and 0 is refused.
#[tokio::test]
async fn the_plans_statement_timeout_cannot_be_lifted() {
    let env = pooled(2).await;
    let a = env.connect("acme").await;
    // The sample plan's limit is 60s.
    for sql in [
        "RESET statement_timeout",
        "SET statement_timeout TO DEFAULT",
        "SET SESSION statement_timeout = DEFAULT",
        "RESET ALL",
        "BEGIN; SET LOCAL statement_timeout TO DEFAULT",
    ] {
        a.batch_execute("SET statement_timeout = '5s'")
            .await
            .unwrap();
        a.batch_execute(sql).await.unwrap();
        let row = a.query_one("SHOW statement_timeout", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "1min", "{sql}");
        let _ = a.batch_execute("COMMIT").await;
    }
    let err = a
        .batch_execute("SET statement_timeout = 0")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
}
