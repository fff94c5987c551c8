//! The pump against in-memory peers.

use super::*;
use crate::pool::server_conn::SERVER_WHOLE;
use crate::protocol::encode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server that streams far more than the pump may hold, to a client that reads
/// nothing: the pump must stop reading, so the server's writes stall.
#[tokio::test]
async fn a_client_that_stops_reading_bounds_what_the_proxy_buffers() {
    let (mut client_far, mut client_near) = tokio::io::duplex(64 * 1024);
    let (mut server_near, mut server_far) = tokio::io::duplex(64 * 1024);
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&written);
    let producer = tokio::spawn(async move {
        let mut row = BytesMut::new();
        encode::raw(b'D', &[b'x'; 8192], &mut row);
        loop {
            if server_far.write_all(&row).await.is_err() {
                break;
            }
            counter.fetch_add(row.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut pump = Pump::default();
    let mut relay = Relay::new(
        1 << 20,
        super::super::relay::RelayRules::sample_shared(None),
    );
    let mut rbuf = BytesMut::new();
    let mut scanner = FrameScanner::new(SERVER_WHOLE, 1 << 20);
    let mut tracker = ConnTracker::default();
    let mut params = BTreeMap::new();
    let mut pooled = PooledState::default();
    let mut side = ServerSide {
        stream: &mut server_near,
        rbuf: &mut rbuf,
        scanner: &mut scanner,
        tracker: &mut tracker,
        params: &mut params,
        pooled: &mut pooled,
    };
    let run = crate::timers::timeout(
        std::time::Duration::from_millis(500),
        pump.run(&mut relay, &mut client_near, &mut side),
    )
    .await;
    assert!(run.is_err(), "pump keeps running while blocked");
    let total = written.load(std::sync::atomic::Ordering::Relaxed);
    // Two 64 KiB pipes, the high-water mark, one read chunk and one row of slack.
    let bound = 2 * 64 * 1024 + HIGH_WATER + 2 * READ_CHUNK + 8192 + 5;
    assert!(total <= bound, "server wrote {total} bytes, bound {bound}");
    assert!(total > 64 * 1024, "data did flow: {total}");

    // Once the client reads, the flow resumes.
    let mut sink = vec![0u8; 1 << 20];
    let mut reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < 4 << 20 {
            got += client_far.read(&mut sink).await.unwrap();
        }
        // Hand the stream back: dropping it here would end the pump with a broken pipe.
        (got, client_far)
    });
    let got = tokio::select! {
        end = pump.run(&mut relay, &mut client_near, &mut side) => panic!("pump ended: {end:?}"),
        done = &mut reader => done.unwrap().0,
    };
    assert!(got >= 4 << 20);
    producer.abort();
}
