//! Session-mode forwarding against real PostgreSQL: extended protocol, Flush, pipelining,
//! errors in and out of transactions, notices, large results and backpressure, COPY both
//! ways, cancel, many clients, and server connections that clients abandon mid-request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::raw::Raw;
use common::{code, start, start_with};
use futures_util::{SinkExt, TryStreamExt};
use postgres_protocol::message::frontend;

#[tokio::test]
async fn extended_protocol_and_pipelined_queries() {
    let env = start().await;
    let c = env.connect("acme").await;
    let stmt = c
        .prepare("SELECT name FROM items WHERE id > $1 ORDER BY id")
        .await
        .unwrap();
    let rows = c.query(&stmt, &[&0i64]).await.unwrap();
    assert_eq!(rows.len(), 2);

    // tokio-postgres pipelines concurrent requests on one connection.
    let queries = (0..50).map(|i| {
        let c = &c;
        async move {
            let row = c
                .query_one(
                    "SELECT $1::int * 2, current_setting('app.current_tenant_id')",
                    &[&i],
                )
                .await
                .unwrap();
            (row.get::<_, i32>(0), row.get::<_, String>(1))
        }
    });
    let results = futures_util::future::join_all(queries).await;
    for (i, (doubled, tenant)) in results.into_iter().enumerate() {
        assert_eq!(doubled, 2 * i as i32);
        assert_eq!(tenant, pgtenant::demo::ACME_ID);
    }
}

/// asyncpg sends Parse/Describe followed by Flush (no Sync) and waits for the replies.
#[tokio::test]
async fn flush_without_sync_gets_its_replies() {
    let env = start().await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let mut out = BytesMut::new();
    frontend::parse("s1", "SELECT $1::int + 1", [23u32], &mut out).unwrap();
    frontend::describe(b'S', "s1", &mut out).unwrap();
    frontend::flush(&mut out);
    raw.send(&out).await;
    let tags: Vec<u8> = [raw.recv().await, raw.recv().await, raw.recv().await]
        .iter()
        .map(|m| m.tag)
        .collect();
    assert_eq!(tags, b"1tT");

    let mut out = BytesMut::new();
    frontend::bind(
        "",
        "s1",
        [1i16],
        [Some(41i32)],
        |v, buf| {
            buf.extend_from_slice(&v.unwrap().to_be_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [1i16],
        &mut out,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    raw.send(&out).await;
    let msgs = raw.until_ready().await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    assert_eq!(&row.body[row.body.len() - 4..], &42i32.to_be_bytes());
}

#[tokio::test]
async fn errors_inside_and_outside_transactions_behave_as_on_postgres() {
    let env = start().await;
    let c = env.connect("acme").await;
    let err = c
        .simple_query("SELECT * FROM nosuchtable")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42P01");
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO items (name) VALUES ('in txn')")
        .await
        .unwrap();
    let err = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(code(&err), "22012");
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "25P02", "the transaction is aborted");
    c.simple_query("ROLLBACK").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM items WHERE name = 'in txn'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn notices_reach_the_client() {
    let env = start().await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.query("DROP TABLE IF EXISTS no_such_table_here").await;
    let msgs = raw.until_ready().await;
    let notice = msgs
        .iter()
        .find(|m| m.tag == b'N')
        .expect("a NoticeResponse");
    assert_eq!(notice.sqlstate().as_deref(), Some("00000"));
}

#[tokio::test]
async fn large_results_arrive_whole() {
    let env = start().await;
    let c = env.connect("acme").await;
    let rows = c
        .query(
            "SELECT g, md5(g::text) FROM generate_series(1, 300000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 300_000);
    assert_eq!(rows[299_999].get::<_, i32>(0), 300_000);
}

#[tokio::test]
async fn copy_of_ten_megabytes_is_byte_identical_both_ways() {
    let env = start().await;
    let c = env.connect("initech").await;
    c.batch_execute("CREATE TABLE blob (id int PRIMARY KEY, payload text NOT NULL)")
        .await
        .unwrap();
    let mut data = Vec::with_capacity(11 << 20);
    let mut i = 0u32;
    while data.len() < 10 << 20 {
        let payload: String = (0..8)
            .map(|k| format!("{:08x}", (i.wrapping_mul(2654435761)) ^ k))
            .collect();
        data.extend_from_slice(format!("{i}\t{payload}\n").as_bytes());
        i += 1;
    }
    let sink = c.copy_in("COPY blob FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, i as u64);

    let stream = c
        .copy_out("COPY (SELECT * FROM blob ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "COPY out differs from what went in");
}

#[tokio::test]
async fn cancel_stops_a_long_query_within_two_seconds() {
    let env = start().await;
    let c = env.connect("acme").await;
    let token = c.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let err = c.simple_query("SELECT pg_sleep(60)").await.unwrap_err();
    assert_eq!(code(&err), "57014");
    // A failure-only limit: the statement was cancelled, not run to its end.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    canceller.await.unwrap();
    // The session goes on.
    c.simple_query("SELECT 1").await.unwrap();

    // A guessed key does nothing: a fresh client's query runs to completion.
    let other = env.connect("acme").await;
    let mut packet = BytesMut::new();
    frontend::cancel_request(12345, 678, &mut packet);
    let mut raw = tokio::net::TcpStream::connect(env.addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, &packet)
        .await
        .unwrap();
    other.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_complete() {
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 210", 1)
    })
    .await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let tenant = if i % 2 == 0 { "acme" } else { "globex" };
        let config = env.pg_config(tenant);
        let barrier = std::sync::Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let c = common::connect_with(config).await.unwrap();
            barrier.wait().await;
            let n: i64 = c
                .query_one("SELECT count(*) FROM items", &[])
                .await
                .unwrap()
                .get(0);
            let id: String = c
                .query_one("SELECT current_setting('app.current_tenant_id')", &[])
                .await
                .unwrap()
                .get(0);
            (tenant, n, id)
        }));
    }
    let all = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("200 clients finish");
    for t in all {
        let (tenant, n, id) = t.unwrap();
        match tenant {
            "acme" => assert_eq!((n, id.as_str()), (2, pgtenant::demo::ACME_ID)),
            _ => assert_eq!((n, id.as_str()), (1, pgtenant::demo::GLOBEX_ID)),
        }
    }
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// With one server connection in the pool, the next session must reuse the one the previous
/// client abandoned: it must find it clean.
#[tokio::test]
async fn a_client_leaving_mid_transaction_leaves_no_state_behind() {
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 1", 1)
    })
    .await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.query(
        "SET work_mem = '7MB'; PREPARE leaked AS SELECT 1; LISTEN leaked_channel; \
         SELECT pg_advisory_lock(4242); CREATE TEMP TABLE leaked_temp (x int); \
         DECLARE leaked_cursor CURSOR WITH HOLD FOR SELECT 1",
    )
    .await;
    raw.until_ready().await;
    raw.query("SELECT pg_backend_pid()").await;
    let msgs = raw.until_ready().await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    let first_pid: i32 = std::str::from_utf8(&row.body[6..])
        .unwrap()
        .parse()
        .unwrap();
    raw.query("BEGIN; INSERT INTO items (name) VALUES ('uncommitted'); SET LOCAL statement_timeout = '1s'")
        .await;
    raw.until_ready().await;
    drop(raw);

    let c = env.connect("acme").await;
    assert_eq!(
        backend_pid(&c).await,
        first_pid,
        "the same server connection"
    );
    let row = c
        .query_one(
            "SELECT current_setting('work_mem'), \
                    (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaked'), \
                    (SELECT count(*) FROM pg_listening_channels()), \
                    0::bigint, \
                    to_regclass('pg_temp.leaked_temp') IS NULL, \
                    (SELECT count(*) FROM pg_cursors WHERE name = 'leaked_cursor'), \
                    (SELECT count(*) FROM items WHERE name = 'uncommitted'), \
                    txid_current_if_assigned() IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB");
    assert_eq!(row.get::<_, i64>(1), 0, "prepared statements");
    assert_eq!(row.get::<_, i64>(2), 0, "LISTEN");
    let locks =
        env.admin_a("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242");
    assert_eq!(locks.trim(), "0", "advisory locks");
    assert!(row.get::<_, bool>(4), "temp table");
    assert_eq!(row.get::<_, i64>(5), 0, "cursors");
    assert_eq!(row.get::<_, i64>(6), 0, "uncommitted row rolled back");
    assert!(row.get::<_, bool>(7), "not inside the old transaction");
}

#[tokio::test]
async fn a_client_leaving_mid_copy_leaves_no_rows_and_a_usable_connection() {
    // COPY FROM is not allowed under row-level security, so use the dedicated tenant, whose
    // shard gets a single server connection.
    let env = start_with("", |t| {
        t.replacen("max_connections = 20", "max_connections = 1", 1)
    })
    .await;
    let c = env.connect("initech").await;
    c.batch_execute("CREATE TABLE copied (line text)")
        .await
        .unwrap();
    let pid = backend_pid(&c).await;
    drop(c);
    let t = env.tenant("initech");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@initech")], &t.password).await;
    raw.query("COPY copied FROM STDIN").await;
    assert_eq!(raw.recv().await.tag, b'G');
    let mut out = BytesMut::new();
    for i in 0..100 {
        Raw::put(&mut out, b'd', format!("half-copied {i}\n").as_bytes());
    }
    raw.send(&out).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(raw);

    let c = env.connect("initech").await;
    assert_eq!(
        backend_pid(&c).await,
        pid,
        "the connection was recovered, not replaced"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM copied", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_client_leaving_mid_query_frees_its_server_connection_quickly() {
    // The next client may wait 20 s for the only server connection: less than the abandoned
    // statement's 30 s, so it is served only if that statement was cancelled.
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 1", 1)
            .replacen(
                "mode = \"transaction\"",
                "mode = \"transaction\"\ncheckout_timeout = \"20s\"",
                1,
            )
    })
    .await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.query("SELECT pg_sleep(30)").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(raw);
    let c = env.connect("acme").await;
    c.simple_query("SELECT 1")
        .await
        .expect("served before the abandoned pg_sleep(30) ended: it was cancelled");
}

#[tokio::test]
async fn a_client_that_stops_reading_blocks_the_server_not_the_proxy() {
    let env = start().await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let before = common::rss_kib();
    raw.query("SELECT 'marker-backpressure', repeat('x', 10000) FROM generate_series(1, 200000)")
        .await;
    // Do not read. The server backend must end up waiting to write to its client (pgtenant),
    // which means pgtenant stopped reading instead of buffering 2 GB.
    let mut waiting = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waiting = env.admin_a(
            "SELECT wait_event FROM pg_stat_activity WHERE query LIKE '%''marker-backpressure''%' AND pid <> pg_backend_pid()",
        );
        if waiting.trim() == "ClientWrite" {
            break;
        }
    }
    assert_eq!(waiting.trim(), "ClientWrite");
    // This process (pgtenant and the test client) holds a bounded part of the 2 GB result:
    // what the pump buffers plus the sockets, not the result.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = common::rss_kib().saturating_sub(before);
    eprintln!("a client not reading a 2 GB result: pgtenant's process grew by {grown} KiB");
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
    drop(raw);
    // The abandoned query is cancelled and the proxy carries on.
    let c = env.connect("acme").await;
    c.simple_query("SELECT 1").await.unwrap();
}

/// A server connection that dies between transactions (transaction mode: the client holds
/// none) is never handed out again: the client's next transaction runs on another one, without
/// an error. One that dies inside a transaction gives that client an error, not a hang, and
/// the others carry on.
#[tokio::test]
async fn a_server_connection_that_dies_gives_the_client_an_error_and_others_carry_on() {
    let env = start().await;
    let c = env.connect("globex").await;
    let pid = backend_pid(&c).await;
    // With a timeout, pg_terminate_backend waits until the backend has exited (a loaded
    // machine can take a while); then its close has a moment to reach pgtenant.
    env.admin_a(&format!("SELECT pg_terminate_backend({pid}, 10000)"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.simple_query("SELECT 1").await.unwrap();
    assert_ne!(backend_pid(&c).await, pid, "a stale connection was used");

    c.simple_query("BEGIN").await.unwrap();
    let pid = backend_pid(&c).await;
    env.admin_a(&format!("SELECT pg_terminate_backend({pid})"));
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.code().is_some() || err.is_closed(),
        "an error, not a hang: {err}"
    );
    let again = env.connect("globex").await;
    again.simple_query("SELECT 1").await.unwrap();
    assert_ne!(backend_pid(&again).await, pid);
}

#[tokio::test]
async fn a_malformed_message_ends_only_that_session_with_08p01() {
    let env = start().await;
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    // A Terminate whose length is below the minimum of 4.
    raw.send(&[b'X', 0, 0, 0, 2]).await;
    let m = raw.recv().await;
    assert_eq!((m.tag, m.sqlstate().as_deref()), (b'E', Some("08P01")));
    assert!(raw.try_recv().await.is_none(), "then the connection closes");

    // Garbage instead of a startup packet: the connection is dropped, the proxy lives on.
    let mut junk = tokio::net::TcpStream::connect(env.addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut junk, &[0xff; 64])
        .await
        .unwrap();
    env.connect("acme")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}
