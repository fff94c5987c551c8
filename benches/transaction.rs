//! Criterion benchmark of one whole pooled transaction through the session engine, against
//! an in-memory server: the client's Query is read, a server connection attached (the tenant
//! binding goes in front of the query, as for a shared tenant in transaction mode), the
//! guard checks the text, the server's reply (the binding's CommandComplete, consumed, then
//! RowDescription, DataRow, CommandComplete, ReadyForQuery) goes back, and the connection is
//! released at the ReadyForQuery. Sockets are in-memory pipes on one thread, so what is
//! measured is the proxy's own work per transaction, without the kernel's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use pgtenant::pool::cache::PooledState;
use pgtenant::pool::server_conn::SERVER_WHOLE;
use pgtenant::protocol::encode;
use pgtenant::protocol::frame::FrameScanner;
use pgtenant::protocol::tracker::ConnTracker;
use pgtenant::session::pump::{Pump, PumpEnd, ServerSide};
use pgtenant::session::relay::{ClientStep, Relay, RelayRules};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The server's side of the in-memory connection: reads one whole message and answers it
/// as PostgreSQL answers pgbench's `-S` query with the binding in front.
async fn serve_one(server: &mut DuplexStream, buf: &mut BytesMut, reply: &[u8]) {
    buf.clear();
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() > len {
                break;
            }
        }
        assert!(server.read_buf(buf).await.unwrap() > 0, "pump closed");
    }
    assert_eq!(buf[0], b'Q');
    server.write_all(reply).await.unwrap();
}

struct Engine {
    relay: Relay,
    pump: Pump,
    client_near: DuplexStream,
    client_far: DuplexStream,
    server_near: DuplexStream,
    server_far: DuplexStream,
    rbuf: BytesMut,
    scanner: FrameScanner,
    tracker: ConnTracker,
    params: BTreeMap<String, String>,
    pooled: PooledState,
    /// What the client gets back per transaction, and what it has left to read.
    reply_len: usize,
    unread: usize,
    server_buf: BytesMut,
    client_buf: Vec<u8>,
}

fn server_reply() -> BytesMut {
    let mut out = BytesMut::new();
    encode::raw(b'C', b"SET\0", &mut out);
    support::pgbench_select_reply(&mut out);
    out
}

impl Engine {
    fn new() -> Engine {
        let mut rules = RelayRules::sample_shared(None);
        // Transaction pooling: the client's statement names are its own.
        rules.policy.prepared_prefix = Some("pgt_c1_".into());
        let (client_near, client_far) = tokio::io::duplex(64 * 1024);
        let (server_near, server_far) = tokio::io::duplex(64 * 1024);
        let reply = server_reply();
        Engine {
            relay: Relay::new(1 << 20, rules),
            pump: Pump::default(),
            client_near,
            client_far,
            server_near,
            server_far,
            rbuf: BytesMut::new(),
            scanner: FrameScanner::new(SERVER_WHOLE, 1 << 20),
            tracker: ConnTracker::default(),
            params: BTreeMap::new(),
            pooled: PooledState::default(),
            // The client sees neither the binding's reply nor anything else of pgtenant's.
            reply_len: reply.len() - 9,
            unread: 0,
            server_buf: BytesMut::new(),
            client_buf: vec![0; 64 * 1024],
        }
    }

    /// One transaction, as the transaction-pooling loop runs it.
    async fn transaction(&mut self, query: &[u8], reply: &[u8]) {
        // The client sends its query; between transactions the engine flushes the previous
        // reply and reads the query; the client reads that reply.
        self.client_far.write_all(query).await.unwrap();
        self.pump
            .wait_for_client(&mut self.client_near)
            .await
            .unwrap();
        while self.unread > 0 {
            let n = self.client_far.read(&mut self.client_buf).await.unwrap();
            self.unread -= n;
        }
        self.unread = self.reply_len;
        let mut side = ServerSide {
            stream: &mut self.server_near,
            rbuf: &mut self.rbuf,
            scanner: &mut self.scanner,
            tracker: &mut self.tracker,
            params: &mut self.params,
            pooled: &mut self.pooled,
        };
        self.relay
            .attach(self.pump.to_server_mut(), side.tracker, side.pooled, false);
        let step = self
            .pump
            .process_client(&mut self.relay, &mut side)
            .unwrap();
        assert!(matches!(step, ClientStep::Continue));
        let (end, ()) = tokio::join!(
            self.pump
                .run(&mut self.relay, &mut self.client_near, &mut side),
            serve_one(&mut self.server_far, &mut self.server_buf, reply),
        );
        assert!(matches!(end, PumpEnd::Released), "{end:?}");
    }
}

fn transaction(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = server_reply();
    // As pgbench -S sends them: the same statement with another literal each time (the
    // guard's memo answers after one full check: only a constant differs), the same text
    // again (as an unnamed Parse per transaction is), and a text with another name each time
    // (the guard lexes and checks every one).
    let query = |sql: String| {
        let mut query = BytesMut::new();
        encode::raw(b'Q', sql.as_bytes(), &mut query);
        query
    };
    let queries: Vec<BytesMut> = (0..1000)
        .map(|i| {
            query(format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};\0",
                48213 + i * 37
            ))
        })
        .collect();
    let new_texts: Vec<BytesMut> = (0..1000)
        .map(|i| {
            query(format!(
                "SELECT abalance AS a{i} FROM pgbench_accounts WHERE aid = 48213;\0"
            ))
        })
        .collect();
    let mut engine = Engine::new();
    // Warm-up outside the measurement: buffers grown, the first reply in flight.
    rt.block_on(engine.transaction(&queries[0], &reply));
    let mut next = queries.iter().cycle();
    c.bench_function("pooled_transaction_shared_tenant", |b| {
        b.iter(|| rt.block_on(engine.transaction(next.next().unwrap(), &reply)))
    });
    c.bench_function("pooled_transaction_shared_tenant_repeated_text", |b| {
        b.iter(|| rt.block_on(engine.transaction(&queries[0], &reply)))
    });
    let mut next = new_texts.iter().cycle();
    c.bench_function("pooled_transaction_shared_tenant_new_text", |b| {
        b.iter(|| rt.block_on(engine.transaction(next.next().unwrap(), &reply)))
    });
}

criterion_group!(benches, transaction);
criterion_main!(benches);
