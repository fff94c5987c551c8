//! Large objects live outside row-level security and are shared by the login role: neither the
//! `lo_*` functions nor the FunctionCall message libpq uses for them are allowed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::raw::Raw;
use common::{all_rows, assert_all_refused, assert_isolation_intact, start};

#[tokio::test]
async fn large_objects_are_out_of_reach() {
    let env = start().await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    assert_all_refused(
        &acme,
        &[
            "SELECT lo_create(0)",
            "SELECT lo_from_bytea(0, 'secret')",
            "SELECT lo_get(16384)",
            "SELECT lo_import('/etc/passwd')",
            "SELECT lo_export(16384, '/tmp/x')",
            "SELECT lo_unlink(16384)",
            "SELECT loread(lo_open(16384, 262144), 100)",
            "SELECT pg_catalog.lo_put(16384, 0, 'x')",
        ],
    )
    .await;

    // The fast-path FunctionCall message (libpq's lo_open etc.): refused with 42501, and the
    // session goes on.
    let t = env.tenant("acme");
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    // FunctionCall: oid of lo_open (952), no format codes, 2 args, no result format.
    let mut body = Vec::new();
    body.extend_from_slice(&952i32.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&2i16.to_be_bytes());
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&16384i32.to_be_bytes());
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&0x40000i32.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    let mut out = bytes::BytesMut::new();
    Raw::put(&mut out, b'F', &body);
    raw.send(&out).await;
    let replies = raw.until_ready().await;
    let err = replies.iter().find(|m| m.tag == b'E').unwrap();
    assert_eq!(err.sqlstate().as_deref(), Some("42501"));
    raw.query("SELECT 1").await;
    assert!(raw.until_ready().await.iter().any(|m| m.tag == b'D'));
    assert_isolation_intact(&env, &before, &acme).await;
}
