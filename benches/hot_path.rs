//! Criterion benchmarks of the per-message hot path: framing server output (DataRows with a
//! ReadyForQuery every so often) and client input, as the relay does it, plus the
//! per-connection costs (SCRAM exchange, identity resolution, startup parsing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgtenant::auth::identity::{Claims, resolve};
use pgtenant::auth::scram::{SCRAM_SHA_256, ScramServer};
use pgtenant::auth::verifier::ScramVerifier;
use pgtenant::pool::cache::PooledState;
use pgtenant::pool::server_conn::SERVER_WHOLE;
use pgtenant::protocol::encode;
use pgtenant::protocol::frame::FrameScanner;
use pgtenant::protocol::startup::parse_initial;
use pgtenant::protocol::tracker::ConnTracker;
use pgtenant::session::relay::{Relay, RelayRules};
use pgtenant::tenant::guard::lexer::TokenBuf;
use pgtenant::tenant::guard::{PassedTexts, Policy};

/// 64 KiB of what pgbench -S gets back: RowDescription, DataRow, CommandComplete, ReadyForQuery.
fn server_stream() -> BytesMut {
    let mut out = BytesMut::new();
    while out.len() < 64 * 1024 {
        support::pgbench_select_reply(&mut out);
    }
    out
}

fn client_stream() -> BytesMut {
    let mut out = BytesMut::new();
    while out.len() < 64 * 1024 {
        encode::raw(
            b'Q',
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;\0",
            &mut out,
        );
    }
    out
}

fn policy() -> Policy {
    RelayRules::sample_shared(None).policy
}

fn rules() -> RelayRules {
    RelayRules::sample_shared(None)
}

fn guard(c: &mut Criterion) {
    let p = policy();
    let mut g = c.benchmark_group("guard");
    for (name, sql) in [
        (
            "pgbench_select",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
        ),
        (
            "orm_select",
            "SELECT \"items\".\"id\", \"items\".\"name\", \"items\".\"created_at\" FROM \"items\" WHERE \"items\".\"tenant_id\" = $1 AND \"items\".\"name\" LIKE $2 ORDER BY \"items\".\"id\" DESC LIMIT 50 OFFSET 0",
        ),
        (
            "insert_returning",
            "INSERT INTO items (name, payload) VALUES ('x', '{\"a\": [1,2,3]}'::jsonb) RETURNING id",
        ),
        ("set_timezone", "SET TIME ZONE 'Europe/Paris'"),
        (
            "refused_set_config",
            "SELECT set_config('app.current_tenant_id', $1, false)",
        ),
    ] {
        g.throughput(Throughput::Bytes(sql.len() as u64));
        // As a session checks: with its kept token buffer.
        let mut buf = TokenBuf::default();
        g.bench_function(name, |b| {
            b.iter(|| black_box(p.check_reusing(black_box(sql.as_bytes()), true, &mut buf)))
        });
    }
    // As a session's memo answers a text it passed before with other constants in it.
    for (name, seen, sql) in [
        (
            "pgbench_select_other_constants",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
        ),
        (
            "insert_returning_other_constants",
            "INSERT INTO items (name, payload) VALUES ('x', '{\"a\": [1,2,3]}'::jsonb) RETURNING id",
            "INSERT INTO items (name, payload) VALUES ('yz', '{\"b\": 4}'::jsonb) RETURNING id",
        ),
    ] {
        g.throughput(Throughput::Bytes(sql.len() as u64));
        let (mut buf, mut passed) = (TokenBuf::default(), PassedTexts::default());
        p.check_remembering(seen.as_bytes(), true, &mut buf, &mut passed);
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(p.check_remembering(
                    black_box(sql.as_bytes()),
                    true,
                    &mut buf,
                    &mut passed,
                ))
            })
        });
    }
    g.finish();
}

fn relay(c: &mut Criterion) {
    let server = server_stream();
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(server.len() as u64));
    g.bench_function("server_to_client_64k", |b| {
        let mut relay = Relay::new(1 << 20, rules());
        let mut scanner = FrameScanner::new(SERVER_WHOLE, 1 << 20);
        let mut tracker = ConnTracker::default();
        let mut pooled = PooledState::default();
        let mut params = BTreeMap::new();
        let mut out = BytesMut::with_capacity(128 * 1024);
        b.iter(|| {
            let mut input = server.clone();
            out.clear();
            relay
                .server_bytes(
                    &mut scanner,
                    &mut input,
                    &mut out,
                    &mut tracker,
                    &mut params,
                    &mut pooled,
                )
                .unwrap();
            black_box(out.len())
        })
    });
    let client = client_stream();
    g.throughput(Throughput::Bytes(client.len() as u64));
    g.bench_function("client_to_server_64k", |b| {
        let mut relay = Relay::new(1 << 20, rules());
        let mut tracker = ConnTracker::default();
        let mut pooled = PooledState::default();
        let mut out = BytesMut::with_capacity(128 * 1024);
        b.iter(|| {
            let mut input = client.clone();
            out.clear();
            relay
                .client_bytes(&mut input, &mut out, &mut tracker, &mut pooled)
                .unwrap();
            black_box(out.len())
        })
    });
    g.finish();
}

fn connection_setup(c: &mut Criterion) {
    let verifier = ScramVerifier::parse(&ScramVerifier::from_password(b"pw")).unwrap();
    c.bench_function("scram_server_exchange", |b| {
        // Both server steps, with a proof that fails only at the final comparison: the same
        // HMAC/SHA work as a success (the client's PBKDF2 is not the server's cost).
        b.iter(|| {
            let mut server = ScramServer::new(verifier.clone(), true, None);
            let first = server
                .client_first(SCRAM_SHA_256, b"n,,n=,r=rOprNGfwEbeRWgbNEkqO")
                .unwrap();
            let nonce = first.split(',').next().unwrap();
            let last = format!("c=biws,{nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
            black_box(server.client_final(last.as_bytes()).unwrap_err());
        });
    });

    let v = ScramVerifier::from_password(b"pw");
    let mut text = String::from(
        "[listen]\naddr = \"127.0.0.1:0\"\n[shards.a]\nhost = \"h\"\ndatabase = \"d\"\nuser = \"u\"\n",
    );
    for i in 0..1000 {
        text.push_str(&format!(
            "[[tenants]]\nid = \"00000000-0000-0000-0000-{i:012}\"\nname = \"t{i}\"\nplacement = {{ kind = \"shared\", shard = \"a\" }}\nusers = [{{ name = \"app\", scram = \"{v}\" }}]\n"
        ));
    }
    let snapshot = pgtenant::config::load_str(&text, Path::new("bench.toml")).unwrap();
    c.bench_function("resolve_identity_1000_tenants", |b| {
        b.iter(|| {
            black_box(
                resolve(
                    &snapshot,
                    Some("db.example.com"),
                    Claims {
                        sni: Some("t517.db.example.com"),
                        user: "app@t517",
                        database: Some("t517"),
                    },
                )
                .unwrap(),
            )
        })
    });

    let mut startup = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [
            ("user", "app@acme"),
            ("database", "acme"),
            ("application_name", "pgbench"),
            ("client_encoding", "UTF8"),
        ],
        &mut startup,
    )
    .unwrap();
    c.bench_function("parse_startup_message", |b| {
        b.iter(|| black_box(parse_initial(&startup).unwrap()))
    });
}

criterion_group!(benches, guard, relay, connection_setup);
criterion_main!(benches);
