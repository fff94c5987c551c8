//! Authentication and the startup packet: wrong passwords, unknown tenants and unknown users
//! are indistinguishable; identity sources must agree; startup parameters are an allow-list.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{BufMut, BytesMut};
use common::raw::{Msg, Raw};
use common::{code, connect_with, start};

/// Runs a raw startup as `user` with `password` up to the end of authentication.
async fn attempt(env: &common::Env, user: &str, password: &str) -> Result<(), Msg> {
    let mut raw = Raw::startup(env.addr(), &[("user", user)]).await;
    raw.authenticate(password).await
}

#[tokio::test]
async fn wrong_password_unknown_tenant_and_unknown_user_look_the_same() {
    let env = start().await;
    let good = env.tenant("acme").password.clone();
    let cases = [
        ("app@acme", "wrong-password"),
        ("app@nosuchtenant", good.as_str()),
        ("nobody@acme", good.as_str()),
    ];
    for (user, password) in cases {
        let err = attempt(&env, user, password).await.expect_err("must fail");
        assert_eq!(err.sqlstate().as_deref(), Some("28P01"), "{user}");
        assert_eq!(err.field(b'S').as_deref(), Some("FATAL"));
        // The message echoes the user name exactly as sent, whether or not the tenant or
        // user exists: the text tells nothing the client did not send.
        assert_eq!(
            err.field(b'M').unwrap(),
            format!("password authentication failed for user \"{user}\"")
        );
    }

    // And tokio-postgres reports the same code.
    let mut c = env.pg_config("acme");
    c.password("nope");
    assert_eq!(code(&connect_with(c).await.unwrap_err()), "28P01");
}

/// The SCRAM exchange for an unknown identity runs to the end and offers a stable salt, so
/// the salt does not reveal whether the user exists.
#[tokio::test]
async fn unknown_users_get_a_full_exchange_with_a_stable_salt() {
    let env = start().await;
    let mut salts = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::startup(env.addr(), &[("user", "ghost@acme")]).await;
        let sasl = raw.recv().await;
        assert_eq!(sasl.tag, b'R');
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::sasl_initial_response(
            "SCRAM-SHA-256",
            b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL",
            &mut out,
        )
        .unwrap();
        raw.send(&out).await;
        let cont = raw.recv().await;
        assert_eq!(cont.tag, b'R', "server-first-message, not an early error");
        let text = String::from_utf8_lossy(&cont.body[4..]).into_owned();
        let salt = text
            .split(',')
            .find(|p| p.starts_with("s="))
            .unwrap()
            .to_owned();
        salts.push(salt);
    }
    assert_eq!(salts[0], salts[1]);
}

#[tokio::test]
async fn disagreeing_identity_sources_are_refused() {
    let env = start().await;
    // The user names acme, the database names globex.
    let mut c = env.pg_config("acme");
    c.dbname("globex");
    assert_eq!(code(&connect_with(c).await.unwrap_err()), "28000");
}

#[tokio::test]
async fn startup_parameters_are_an_allow_list() {
    let env = start().await;
    let pw = env.tenant("acme").password.clone();
    for (params, want) in [
        (
            vec![(
                "options",
                "-c app.current_tenant_id=8d2e4f60-3b1c-4a7d-8e9f-0a1b2c3d4e02",
            )],
            "42501",
        ),
        (vec![("app.current_tenant_id", "x")], "42501"),
        (vec![("options", "-c role=postgres")], "42501"),
        (vec![("replication", "database")], "08P01"),
        (vec![("shared_preload_libraries", "x")], "08P01"),
    ] {
        let mut all = vec![("user", "app@acme")];
        all.extend(params.iter().copied());
        let mut raw = Raw::startup(env.addr(), &all).await;
        let err = raw.authenticate(&pw).await.expect_err("refused");
        assert_eq!(err.sqlstate().as_deref(), Some(want), "{params:?}");
    }

    // Allowed settings reach the server connection.
    let mut c = env.pg_config("acme");
    c.application_name("inventory-service")
        .options("-c statement_timeout=7s -c DateStyle=German");
    let client = connect_with(c).await.unwrap();
    let row = client
        .query_one(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'), current_setting('DateStyle')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "inventory-service");
    assert_eq!(row.get::<_, String>(1), "7s");
    assert_eq!(row.get::<_, String>(2), "German, DMY");

    // A schema tenant's search_path is pgtenant's to set.
    let mut c = env.pg_config("umbrella");
    c.options("-c search_path=public");
    assert_eq!(code(&connect_with(c).await.unwrap_err()), "42501");
}

#[tokio::test]
async fn a_missing_user_name_is_refused() {
    let env = start().await;
    let mut raw = Raw::startup(env.addr(), &[("database", "acme")]).await;
    let m = raw.recv().await;
    assert_eq!(m.tag, b'E');
    assert_eq!(m.sqlstate().as_deref(), Some("28000"));
}

#[tokio::test]
async fn protocol_versions_are_negotiated_down_or_refused() {
    let env = start().await;
    let pw = env.tenant("acme").password.clone();

    // 3.2 with a protocol option: NegotiateProtocolVersion, then a normal session.
    let mut packet = BytesMut::new();
    let body = b"user\0app@acme\0_pq_.test_option\0on\0\0";
    packet.put_u32(8 + body.len() as u32);
    packet.put_u32(196_610);
    packet.put_slice(body);
    let stream = tokio::net::TcpStream::connect(env.addr()).await.unwrap();
    let mut raw = Raw::from_stream(stream);
    raw.send(&packet).await;
    let v = raw.recv().await;
    assert_eq!(v.tag, b'v');
    assert_eq!(&v.body[..4], &0i32.to_be_bytes());
    assert!(String::from_utf8_lossy(&v.body).contains("_pq_.test_option"));
    raw.authenticate(&pw).await.unwrap();
    raw.until_ready().await;
    raw.query("SELECT 1").await;
    assert!(raw.until_ready().await.iter().any(|m| m.tag == b'D'));

    // 2.0 is refused with 0A000.
    let stream = tokio::net::TcpStream::connect(env.addr()).await.unwrap();
    let mut raw = Raw::from_stream(stream);
    raw.send(&[0, 0, 0, 9, 0, 2, 0, 0, 0]).await;
    let m = raw.recv().await;
    assert_eq!(m.sqlstate().as_deref(), Some("0A000"));
}
