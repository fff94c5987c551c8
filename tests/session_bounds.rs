//! What a client makes pgtenant keep for it in transaction pooling (settings, held changes of
//! an open transaction) is bounded in bytes and in count, whichever way it is sent: a Query,
//! a Bind of a prepared statement, or set_config with parameters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, code, start_with};

/// Transaction pooling on the shared shard.
async fn pooled() -> Env {
    start_with("", |t| {
        t.replacen("mode = \"session\"", "mode = \"transaction\"", 1)
    })
    .await
}

/// What a client makes pgtenant keep for it is bounded in bytes, not only in count: custom
/// settings take values of any length (500 of 64 MiB each were accepted), and an open
/// transaction holds its settings, notifications and savepoints until it ends.
#[tokio::test]
async fn what_a_session_makes_pgtenant_keep_is_bounded_in_bytes() {
    let env = pooled().await;
    let a = env.connect("acme").await;
    let value = "x".repeat(600 << 10);
    a.batch_execute(&format!("SET my.one = '{value}'"))
        .await
        .unwrap();
    let err = a
        .batch_execute(&format!("SET my.two = '{value}'"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), "53400");
    // The same name again replaces what it had; a RESET frees it.
    a.batch_execute(&format!("SET my.one = '{value}'"))
        .await
        .unwrap();
    a.batch_execute("RESET my.one").await.unwrap();
    a.batch_execute(&format!("SET my.two = '{value}'"))
        .await
        .unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    let err = a
        .batch_execute(&"SAVEPOINT s; ".repeat(10_001))
        .await
        .unwrap_err();
    assert_eq!(code(&err), "53400");
    a.batch_execute("ROLLBACK").await.unwrap();
    let row = a
        .query_one("SELECT length(current_setting('my.two'))", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 600 << 10);
}

/// A statement prepared once and run again and again: each run's effects are held too.
#[tokio::test]
async fn a_prepared_statement_run_many_times_is_bounded_like_a_query() {
    let env = pooled().await;
    let a = env.connect("acme").await;
    a.batch_execute("BEGIN").await.unwrap();
    let savepoint = a.prepare("SAVEPOINT s").await.unwrap();
    let mut refused = None;
    for i in 0..10_050 {
        if let Err(e) = a.execute(&savepoint, &[]).await {
            refused = Some((i, code(&e)));
            break;
        }
    }
    assert_eq!(refused, Some((10_000, "53400".to_owned())));
    a.batch_execute("ROLLBACK").await.unwrap();
    // The statement runs again once the transaction has ended.
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(&savepoint, &[]).await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
}
