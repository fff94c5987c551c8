//! Protocol abuse: bad, oversize and truncated lengths, unknown messages, invalid UTF-8,
//! slowloris and half-open floods. Each costs the attacker its own connection, never the
//! process, and never another tenant's rows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{all_rows, assert_isolation_intact, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: &str = "";

fn tight(t: String) -> String {
    t.replacen(
        "[listen]\n",
        "[listen]\nstartup_timeout = \"1s\"\nmax_unauthenticated = 50\nmax_message_size = 4096\n",
        1,
    )
}

async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let started = Instant::now();
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed() <= limit,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn malformed_lengths_and_messages_end_only_their_connection() {
    let env = start_with(LIMITS, tight).await;
    let before = all_rows(&env);
    let acme = env.connect("acme").await;
    let t = env.tenant("acme").clone();

    // Startup packets with absurd lengths: closed at once, nothing allocated for them.
    for head in [[0x7f, 0xff, 0xff, 0xff], [0, 0, 0, 0], [0, 0, 0, 3]] {
        let mut s = TcpStream::connect(env.addr()).await.unwrap();
        s.write_all(&head).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    }
    // Invalid UTF-8 in the startup packet.
    let mut s = TcpStream::connect(env.addr()).await.unwrap();
    s.write_all(&[
        0, 0, 0, 17, 0, 3, 0, 0, b'u', b's', b'e', b'r', 0, 0xff, 0xfe, 0, 0,
    ])
    .await
    .unwrap();
    let mut reply = vec![0u8; 256];
    let n = s.read(&mut reply).await.unwrap();
    assert_eq!(reply[0], b'E');
    assert!(String::from_utf8_lossy(&reply[..n]).contains("08P01"));

    // After authentication: a message over max_message_size (54000: a limit, not a broken
    // frame), a length below 4, a truncated message, an unknown message type, and invalid
    // UTF-8 in a query.
    let mut big = bytes::BytesMut::new();
    Raw::put(&mut big, b'Q', &vec![b'x'; 10_000]);
    for (bytes, expect) in [
        (big.to_vec(), Some("54000")),
        (vec![b'Q', 0, 0, 0, 1], Some("08P01")),
        (vec![b'?', 0, 0, 0, 4], Some("08P01")),
        (vec![b'Q', 0, 0, 0, 9, 0xc3, 0x28, b'x', 0, 0], None),
    ] {
        let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
        raw.send(&bytes).await;
        let mut codes = Vec::new();
        while let Some(m) = raw.try_recv().await {
            if m.tag == b'E' {
                codes.push(m.sqlstate().unwrap());
            }
            if m.tag == b'Z' {
                break;
            }
        }
        if let Some(code) = expect {
            assert!(codes.iter().any(|c| c == code), "{codes:?}");
        } else {
            assert!(!codes.is_empty(), "the server refused the bytes: {codes:?}");
        }
    }
    let mut raw = Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.send(&[b'Q', 0, 0, 0, 100, b'S', b'E']).await;
    drop(raw);
    assert_isolation_intact(&env, &before, &acme).await;
}

/// A startup packet sent a byte at a time, each well inside any per-read timeout: the whole
/// startup's timeout (1 s) cuts it before the client is done (8 s of sending).
#[tokio::test]
async fn slowloris_connections_are_cut_at_the_startup_timeout() {
    let env = start_with(LIMITS, tight).await;
    let mut s = TcpStream::connect(env.addr()).await.unwrap();
    let mut packet = vec![0u8, 0, 0, 40, 0, 3, 0, 0];
    packet.extend_from_slice(b"user\0");
    packet.resize(38, b'a');
    packet.extend_from_slice(b"\0\0");
    assert_eq!(packet.len(), 40);
    let mut buf = [0u8; 256];
    let mut sent = 0;
    for b in &packet {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        // The pause between bytes, watching for the proxy's close (or its error).
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Err(_) => continue,
            Ok(_) => break,
        }
    }
    assert!(
        sent < packet.len(),
        "the client sent its whole packet a byte at a time and was never cut"
    );
    assert!(closed_within(&mut s, Duration::from_secs(30)).await);
}

/// More silent connections than the un-authenticated table holds, and a startup timeout
/// (60 s) the test does not wait for: a real client gets in only because the oldest pending
/// handshake makes room.
#[tokio::test]
async fn a_flood_of_silent_connections_does_not_lock_out_real_clients() {
    let env = start_with(LIMITS, |t| {
        t.replacen(
            "[listen]\n",
            "[listen]\nstartup_timeout = \"60s\"\nmax_unauthenticated = 50\n",
            1,
        )
    })
    .await;
    let before = all_rows(&env);
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(env.addr()).await.unwrap());
    }
    let acme = tokio::time::timeout(Duration::from_secs(30), env.connect("acme"))
        .await
        .expect("locked out until the silent connections' startup timeout");
    drop(flood);
    assert_isolation_intact(&env, &before, &acme).await;
}
