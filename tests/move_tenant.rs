//! `MOVE TENANT` under load: the moved tenant's transactions pause, then continue on the new
//! shard (its sessions follow at their next transaction, prepared statements included); the
//! other tenants never notice; the move is written to the configuration file; a move that
//! cannot finish in time changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{code, world};
use tokio_postgres::SimpleQueryMessage;

async fn database_of(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0)
}

fn rows(msgs: Vec<SimpleQueryMessage>) -> Vec<Vec<String>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// What a load loop saw: transactions done, failures, and the databases they ran in.
#[derive(Default, Debug)]
struct Seen {
    done: usize,
    failures: Vec<String>,
    databases: Vec<String>,
}

/// A client running `INSERT` + `SELECT current_database()` transactions (extended protocol,
/// a prepared statement reused across the move) until `stop`.
async fn load(client: tokio_postgres::Client, tag: &'static str, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let insert = client
        .prepare("INSERT INTO items (name) VALUES ($1) RETURNING current_database()")
        .await
        .unwrap();
    while !stop.load(Ordering::Relaxed) {
        let result = async {
            client.batch_execute("BEGIN").await?;
            let row = client.query_one(&insert, &[&tag]).await?;
            client.batch_execute("COMMIT").await?;
            Ok::<String, tokio_postgres::Error>(row.get(0))
        }
        .await;
        match result {
            Ok(db) => {
                seen.done += 1;
                if seen.databases.last() != Some(&db) {
                    seen.databases.push(db);
                }
            }
            Err(e) => seen.failures.push(format!("{e:?}")),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_tenant_under_load_pauses_it_then_continues_on_the_new_shard() {
    let verifier = pgtenant::auth::verifier::ScramVerifier::from_password(b"dba-secret");
    let dir = common::TempDir::new("move");
    let key_file = dir.join("shared-b.key");
    let suffix = format!("{}_{}", std::process::id(), rand_suffix());
    let second_db = format!("moved_{suffix}");
    let shard_b = tokio::task::spawn_blocking({
        let (db, key) = (second_db.clone(), key_file.clone());
        move || common::second_shared_shard(&db, &key)
    })
    .await
    .unwrap();
    let extra =
        format!("[admin]\nusers = [{{ name = \"dba\", scram = \"{verifier}\" }}]\n{shard_b}");
    let (env, path) = common::start_from_file(&extra).await;
    let console = common::connect_with(
        format!(
            "postgresql://dba:dba-secret@127.0.0.1:{}/pgtenant",
            env.port()
        )
        .parse()
        .unwrap(),
    )
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut acme = Vec::new();
    for _ in 0..3 {
        acme.push(tokio::spawn(load(
            env.connect("acme").await,
            "acme under load",
            stop.clone(),
        )));
    }
    let globex = tokio::spawn(load(
        env.connect("globex").await,
        "globex under load",
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let moved = rows(
        console
            .simple_query("MOVE TENANT acme TO shared-b TIMEOUT 10s")
            .await
            .unwrap(),
    );
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0][..3], ["acme", "shared-a", "shared-b"]);
    let paused_ms: f64 = moved[0][3].parse().unwrap();
    eprintln!("MOVE TENANT under load: acme paused {paused_ms} ms");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let shared_db = env.fixture.shared_db.clone();
    let mut acme_done = 0;
    for l in acme {
        let seen = l.await.unwrap();
        assert!(seen.failures.is_empty(), "{seen:?}");
        // Every session was on the old shard, then on the new one, and never back.
        assert_eq!(
            seen.databases,
            [shared_db.clone(), second_db.clone()],
            "{seen:?}"
        );
        acme_done += seen.done;
    }
    let seen = globex.await.unwrap();
    assert!(seen.failures.is_empty(), "{seen:?}");
    assert_eq!(seen.databases, std::slice::from_ref(&shared_db), "{seen:?}");
    // Every committed transaction is in one of the two databases, none twice.
    let count = |db: &str| -> usize {
        world()
            .a
            .psql(
                db,
                "SELECT count(*) FROM items WHERE name = 'acme under load'",
            )
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (before, after) = (count(&shared_db), count(&second_db));
    assert!(before > 0 && after > 0, "{before} / {after}");
    assert_eq!(before + after, acme_done);

    // New sessions go to the new shard; the file says so, and a RELOAD keeps it.
    let fresh = env.connect("acme").await;
    let db = |msgs| rows(msgs)[0][0].clone();

    assert_eq!(database_of(&fresh).await, second_db);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(r#"placement = { kind = "shared", shard = "shared-b" }"#),
        "{text}"
    );
    console.simple_query("RELOAD").await.unwrap();
    assert_eq!(database_of(&fresh).await, second_db);
    // The tenant sees its rows there only (none were copied: moving data is the DBA's).
    assert_eq!(
        db(fresh
            .simple_query("SELECT count(*) FROM items WHERE name = 'acme anvil'")
            .await
            .unwrap()),
        "0"
    );

    // A move that cannot finish in time (a transaction stays open) changes nothing.
    fresh.batch_execute("BEGIN").await.unwrap();
    fresh
        .simple_query("SELECT count(*) FROM items")
        .await
        .unwrap();
    let err = console
        .simple_query("MOVE TENANT acme TO shared-a TIMEOUT 200ms")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "55P03", "{err:?}");
    fresh.batch_execute("COMMIT").await.unwrap();
    assert_eq!(database_of(&fresh).await, second_db);
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains(r#"shard = "shared-b" }"#)
    );
    // Bad names.
    let err = console
        .simple_query("MOVE TENANT acme TO nowhere")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42704");
    let err = console
        .simple_query("MOVE TENANT nobody TO shared-a")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42704");
    // A move the configuration refuses (initech's shard is dedicated to it): the validation
    // error, and nothing changes.
    let err = console
        .simple_query("MOVE TENANT acme TO initech-db")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "F0000", "{err:?}");
    assert!(common::message(&err).contains("dedicated"), "{err:?}");
    assert_eq!(database_of(&fresh).await, second_db);
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}
