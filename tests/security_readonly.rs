//! Read-only users are read-only in the database (issue "Every promise holds on a pooled
//! connection", item 1): they reach every placement as a login role that cannot write, so no
//! sequence of RESET, DISCARD, set_config or pipelining writes a row, in either pool mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use common::raw::Raw;
use postgres_protocol::message::frontend;

/// Rows of every placement's `items` table, as the superusers see them.
fn all_items(env: &common::Env) -> String {
    let w = common::world();
    format!(
        "{}|{}|{}",
        env.admin_a("SELECT count(*) FROM public.items"),
        env.admin_a("SELECT count(*) FROM t_umbrella.items"),
        w.b.psql(
            &env.fixture.dedicated_db,
            "SELECT count(*) FROM public.items"
        )
        .unwrap()
    )
}

/// Runs `sql` as one Query and returns every SQLSTATE reported.
async fn errors_of(raw: &mut Raw, sql: &str) -> Vec<String> {
    raw.query(sql).await;
    raw.until_ready()
        .await
        .iter()
        .filter_map(|m| m.sqlstate())
        .collect()
}

const INSERT: &str = "INSERT INTO items (name) VALUES ('written by a reader')";

#[tokio::test]
async fn read_only_users_cannot_write_by_any_sequence() {
    for session in [false, true] {
        let env = common::start_with("", |t| {
            if session {
                t.replace("mode = \"transaction\"", "mode = \"session\"")
            } else {
                t
            }
        })
        .await;
        let before = all_items(&env);
        for tenant in ["acme", "umbrella", "initech"] {
            let t = env.tenant(tenant).clone();
            let user = format!("reader@{tenant}");
            let mut raw = Raw::connect(env.addr(), &[("user", user.as_str())], &t.password).await;
            let insert = INSERT;
            let attempts = [
                insert.to_owned(),
                format!(
                    "SELECT set_config('default_transaction_read_only', 'off', false); {insert}"
                ),
                format!("RESET ALL; COMMIT; {insert}"),
                format!("DISCARD ALL; {insert}"),
                format!("BEGIN; SET LOCAL transaction_read_only = off; {insert}; COMMIT"),
                format!("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; {insert}"),
                format!(
                    "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'; {insert}"
                ),
                "CREATE TEMP TABLE scratch AS SELECT 1 AS x; DROP TABLE items".to_owned(),
            ];
            for sql in &attempts {
                let errors = errors_of(&mut raw, sql).await;
                assert!(
                    !errors.is_empty(),
                    "session={session} {tenant}: {sql} raised nothing"
                );
                assert_eq!(
                    all_items(&env),
                    before,
                    "session={session} {tenant}: {sql} wrote"
                );
            }
            // Extended protocol, one batch: DISCARD ALL executed, then the INSERT, then Sync.
            let mut out = BytesMut::new();
            for sql in ["DISCARD ALL", insert] {
                Raw::put_parse_bind_execute(&mut out, sql);
            }
            frontend::sync(&mut out);
            raw.send(&out).await;
            let replies = raw.until_ready().await;
            assert!(
                replies.iter().any(|m| m.tag == b'E'),
                "session={session} {tenant}: extended DISCARD ALL + INSERT raised nothing"
            );
            assert_eq!(
                all_items(&env),
                before,
                "session={session} {tenant}: extended batch wrote"
            );
            // Reads still work.
            raw.query("SELECT count(*) FROM items").await;
            let replies = raw.until_ready().await;
            assert!(replies.iter().any(|m| m.tag == b'D'), "{tenant} reads");
        }
    }
}
