//! The floor under any relay: the cheapest forwarders of a PostgreSQL connection, one
//! client connection to one server connection, bytes copied both ways and nothing else (no
//! authentication, no pooling, no parsing). `scripts/instructions.sh` counts the
//! instructions they execute per transaction beside pgtenant's and PgBouncer's, to show what
//! the async runtime costs and what the proxy's own work costs. Not a proxy: it unwraps.
//!
//!   relay_floor tokio|tokio-io|epoll LISTEN_ADDR SERVER_ADDR
//!
//! `tokio`: a current-thread runtime, one task per client, a `select!` over the two reads
//! (the shape of a minimal tokio proxy). `tokio-io`: the same on a runtime without a time
//! driver, as pgtenant's own (`pgtenant::timers`). `epoll`: one mio loop, edge-triggered, no
//! tasks, no timers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, listen, server] = args.as_slice() else {
        panic!("usage: relay_floor tokio|tokio-io|epoll LISTEN_ADDR SERVER_ADDR");
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR");
    let server: SocketAddr = server.parse().expect("SERVER_ADDR");
    match kind.as_str() {
        "tokio" => with_tokio(listen, server, true),
        "tokio-io" => with_tokio(listen, server, false),
        "epoll" => with_epoll(listen, server),
        other => panic!("unknown relay {other}: tokio, tokio-io or epoll"),
    }
}

fn with_tokio(listen: SocketAddr, server: SocketAddr, time: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_io();
    if time {
        builder.enable_time();
    }
    let runtime = builder.build().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                client.set_nodelay(true).unwrap();
                let mut upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                upstream.set_nodelay(true).unwrap();
                let (mut up, mut down) = (vec![0u8; 16384], vec![0u8; 16384]);
                loop {
                    tokio::select! {
                        n = client.read(&mut up) => match n {
                            Ok(0) | Err(_) => return,
                            Ok(n) => upstream.write_all(&up[..n]).await.unwrap(),
                        },
                        n = upstream.read(&mut down) => match n {
                            Ok(0) | Err(_) => return,
                            Ok(n) => client.write_all(&down[..n]).await.unwrap(),
                        },
                    }
                }
            });
        }
    });
}

fn with_epoll(listen: SocketAddr, server: SocketAddr) {
    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token};
    const LISTENER: Token = Token(usize::MAX);
    let mut poll = Poll::new().unwrap();
    let mut listener = TcpListener::bind(listen).unwrap();
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .unwrap();
    // A client's socket at an even index, its server connection at the next.
    let mut sockets: Vec<Option<TcpStream>> = Vec::new();
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 16384];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            assert_eq!(e.kind(), ErrorKind::Interrupted, "{e}");
            continue;
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((client, _)) = listener.accept() {
                    client.set_nodelay(true).unwrap();
                    let upstream = std::net::TcpStream::connect(server).unwrap();
                    upstream.set_nodelay(true).unwrap();
                    upstream.set_nonblocking(true).unwrap();
                    for socket in [client, TcpStream::from_std(upstream)] {
                        let token = Token(sockets.len());
                        sockets.push(Some(socket));
                        let socket = sockets.last_mut().unwrap().as_mut().unwrap();
                        poll.registry()
                            .register(socket, token, Interest::READABLE)
                            .unwrap();
                    }
                }
                continue;
            }
            let (from, to) = (event.token().0, event.token().0 ^ 1);
            while let Some(socket) = sockets[from].as_mut() {
                let n = match socket.read(&mut buf) {
                    Ok(n) if n > 0 => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    _ => {
                        sockets[from] = None;
                        sockets[to] = None;
                        break;
                    }
                };
                // Small replies only (a benchmark's): a full socket buffer is not waited for.
                if let Some(peer) = sockets[to].as_mut() {
                    peer.write_all(&buf[..n]).unwrap();
                }
                if n < buf.len() {
                    break;
                }
            }
        }
    }
}
