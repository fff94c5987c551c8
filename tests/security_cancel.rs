//! Cancels reach only the statement they were meant for (issue "Every promise holds on a
//! pooled connection", item 4): on a shard with a single server connection, one tenant's
//! cancels (sent at every moment around its statements' ends) and statement timeouts never
//! cancel another tenant's statement, in transaction and session pooling.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::code;

fn one_connection(session: bool) -> impl FnOnce(String) -> String {
    move |t| {
        let t = t
            .replace("max_connections = 60", "max_connections = 1")
            .replacen(
                "name = \"acme\"\nplan = \"basic\"\n",
                "name = \"acme\"\nplan = \"basic\"\nsettings = { statement_timeout = \"20ms\" }\n",
                1,
            );
        if session {
            t.replace("mode = \"transaction\"", "mode = \"session\"")
        } else {
            t
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_and_timeouts_never_reach_another_tenant() {
    // Session pooling holds the one connection per client, so there the two tenants take
    // turns by reconnecting; transaction pooling hands it over at every transaction.
    for session in [false, true] {
        let env = common::start_with("", one_connection(session)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let stray = Arc::new(AtomicUsize::new(0));
        let victim_ran = Arc::new(AtomicUsize::new(0));
        let victim = {
            let config = env.pg_config("globex");
            let (stop, stray, ran) = (stop.clone(), stray.clone(), victim_ran.clone());
            tokio::spawn(async move {
                let mut globex = common::connect_with(config.clone()).await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match globex.simple_query("SELECT pg_sleep(0.002)").await {
                        Ok(_) => {}
                        Err(e) if code(&e) == "57014" => {
                            stray.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("globex: {e}"),
                    }
                    ran.fetch_add(1, Ordering::Relaxed);
                    if session {
                        // Give the connection back so acme can have it.
                        drop(globex);
                        globex = common::connect_with(config.clone()).await.unwrap();
                    }
                }
            })
        };
        let mut cancels = 0;
        let mut timeouts = 0;
        let rounds = if session { 200 } else { 1000 };
        for i in 0..rounds {
            let acme = env.connect("acme").await;
            // A cancel at a moment anywhere from mid-statement to after its end.
            let token = acme.cancel_token();
            let delay = Duration::from_micros(500 * (i % 8));
            let canceller = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
            });
            let _ = acme.simple_query("SELECT pg_sleep(0.002)").await;
            canceller.await.unwrap();
            cancels += 1;
            // A statement over the plan's 20 ms limit: the server's statement_timeout ends
            // it, and pgtenant must not send a late cancel of its own.
            if i % 5 == 0 {
                let err = acme
                    .simple_query("SELECT pg_sleep(0.05)")
                    .await
                    .unwrap_err();
                assert_eq!(code(&err), "57014");
                timeouts += 1;
            }
            // Let the other tenant have the connection between some rounds.
            if i % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        stop.store(true, Ordering::Relaxed);
        victim.await.unwrap();
        let ran = victim_ran.load(Ordering::Relaxed);
        println!(
            "session={session}: {cancels} cancels and {timeouts} timeouts from acme, {ran} globex statements, {} cancelled",
            stray.load(Ordering::Relaxed)
        );
        assert!(ran > 20, "globex ran only {ran} statements");
        assert_eq!(
            stray.load(Ordering::Relaxed),
            0,
            "session={session}: another tenant's statements were cancelled"
        );
    }
}
