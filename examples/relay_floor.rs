//! The floor under any relay: the cheapest forwarders of a PostgreSQL connection, one
//! client connection to one server connection, bytes copied both ways and nothing else (no
//! authentication, no pooling, no parsing). `scripts/instructions.sh` counts the
//! instructions they execute per transaction beside pgtenant's and PgBouncer's, to show what
//! the async runtime costs and what the proxy's own work costs. Not a proxy: it unwraps.
//!
//!   relay_floor tokio|tokio-io|tasks|tasks-sync|epoll LISTEN_ADDR SERVER_ADDR
//!
//! `tokio`: a current-thread runtime, one task per client, a `select!` over the two reads
//! (the shape of a minimal tokio proxy). `tokio-io`: the same on a runtime without a time
//! driver, as pgtenant's own (`pgtenant::timers`). `tasks`: the same shape (a task per
//! client, `Future`s, `Waker`s, readiness cleared after a short read as tokio does) on the
//! smallest executor and reactor one thread needs: what a runtime of pgtenant's own would
//! cost at least. `tasks-sync`: the same with what a runtime shared across threads needs
//! (wakers that may be woken from any thread, readiness and waiting wakers as atomics, an
//! event tick so a readiness set during a read is never cleared): what a real one would
//! cost. `epoll`: one mio loop, edge-triggered, no tasks, no timers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, listen, server] = args.as_slice() else {
        panic!("usage: relay_floor tokio|tokio-io|tasks|tasks-sync|epoll LISTEN_ADDR SERVER_ADDR");
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR");
    let server: SocketAddr = server.parse().expect("SERVER_ADDR");
    match kind.as_str() {
        "tokio" => with_tokio(listen, server, true),
        "tokio-io" => with_tokio(listen, server, false),
        "tasks" => tasks::run(listen, server),
        "tasks-sync" => tasks_sync::run(listen, server),
        "epoll" => with_epoll(listen, server),
        other => panic!("unknown relay {other}: tokio, tokio-io, tasks, tasks-sync or epoll"),
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

/// A read of a `tasks` relay's socket, through its executor's readiness (its writes are
/// direct: [`Socket::write_all`]).
trait TaskSocket {
    fn poll_read(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<usize>;
}

/// A socket of a `tasks` relay and `Src`, what its executor's reactor keeps of it (the
/// readiness and the waiting reader).
struct Socket<Src> {
    io: mio::net::TcpStream,
    source: Src,
}

impl<Src> Socket<Src> {
    #[inline(always)]
    fn write_all(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.io, bytes).unwrap();
    }
}

/// A client accepted by a `tasks` relay and its own connection to the server, both
/// non-blocking, without Nagle's delay.
fn connect_pair(
    client: mio::net::TcpStream,
    server: std::net::SocketAddr,
) -> [mio::net::TcpStream; 2] {
    client.set_nodelay(true).unwrap();
    let upstream = std::net::TcpStream::connect(server).unwrap();
    upstream.set_nodelay(true).unwrap();
    upstream.set_nonblocking(true).unwrap();
    [client, mio::net::TcpStream::from_std(upstream)]
}

/// The task of a `tasks` relay: [`relay`] at every wake-up, until either side closes.
async fn relay_task<Src>(mut pair: [Socket<Src>; 2])
where
    Socket<Src>: TaskSocket,
{
    let (mut up, mut down) = (vec![0u8; 16384], vec![0u8; 16384]);
    std::future::poll_fn(|cx| relay(cx, &mut pair, &mut up, &mut down)).await
}

/// One wake-up of a `tasks` relay: both reads, each reply written at once (small replies
/// only: a full socket buffer is not waited for).
#[inline(always)]
fn relay<Src>(
    cx: &mut std::task::Context<'_>,
    [client, upstream]: &mut [Socket<Src>; 2],
    up: &mut [u8],
    down: &mut [u8],
) -> std::task::Poll<()>
where
    Socket<Src>: TaskSocket,
{
    use std::task::Poll;
    loop {
        let mut progress = false;
        match client.poll_read(cx, up) {
            Poll::Ready(0) => return Poll::Ready(()),
            Poll::Ready(n) => {
                upstream.write_all(&up[..n]);
                progress = true;
            }
            Poll::Pending => {}
        }
        match upstream.poll_read(cx, down) {
            Poll::Ready(0) => return Poll::Ready(()),
            Poll::Ready(n) => {
                client.write_all(&down[..n]);
                progress = true;
            }
            Poll::Pending => {}
        }
        if !progress {
            return Poll::Pending;
        }
    }
}

/// The smallest executor and reactor for one thread: tasks in a slab, a queue of woken ones,
/// a `Waker` per task that queues its index, and per socket a readiness flag and the waker
/// of the task waiting for it. Not thread-safe (a waker must be woken on its own thread),
/// which a real runtime would have to add: this is the floor under one.
mod tasks {
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::future::Future;
    use std::io::{ErrorKind, Read};
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::task::{Context, Poll, Waker};

    use mio::net::TcpListener;
    use mio::{Events, Interest, Token};

    const LISTENER: Token = Token(usize::MAX);

    thread_local! {
        /// Woken tasks, in order, each at most once.
        static WOKEN: RefCell<VecDeque<usize>> = const { RefCell::new(VecDeque::new()) };
        static QUEUED: RefCell<Vec<bool>> = const { RefCell::new(Vec::new()) };
    }

    fn wake_task(task: usize) {
        let fresh = QUEUED.with_borrow_mut(|q| !std::mem::replace(&mut q[task], true));
        if fresh {
            WOKEN.with_borrow_mut(|w| w.push_back(task));
        }
    }

    /// A task's waker: its index in the slab.
    struct TaskWaker(usize);

    impl std::task::Wake for TaskWaker {
        fn wake(self: std::sync::Arc<Self>) {
            wake_task(self.0);
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            wake_task(self.0);
        }
    }

    /// A socket's readiness as the reactor last saw it, and the task waiting for it.
    struct Source {
        readable: Cell<bool>,
        reader: RefCell<Option<Waker>>,
    }

    type Socket = super::Socket<Rc<Source>>;

    impl super::TaskSocket for Socket {
        #[inline(always)]
        fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<usize> {
            if self.source.readable.get() {
                match self.io.read(buf) {
                    Ok(n) => {
                        // A short read emptied the socket: the next edge says when there is more.
                        if n < buf.len() {
                            self.source.readable.set(false);
                        }
                        return Poll::Ready(n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.source.readable.set(false),
                    Err(_) => return Poll::Ready(0),
                }
            }
            let mut reader = self.source.reader.borrow_mut();
            if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *reader = Some(cx.waker().clone());
            }
            Poll::Pending
        }
    }

    type Task = Pin<Box<dyn Future<Output = ()>>>;

    pub fn run(listen: SocketAddr, server: SocketAddr) {
        let mut poll = mio::Poll::new().unwrap();
        let mut listener = TcpListener::bind(listen).unwrap();
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .unwrap();
        let mut sources: Vec<Rc<Source>> = Vec::new();
        let mut tasks: Vec<Option<(Task, Waker)>> = Vec::new();
        let mut events = Events::with_capacity(256);
        loop {
            while let Some(task) = WOKEN.with_borrow_mut(|w| w.pop_front()) {
                QUEUED.with_borrow_mut(|q| q[task] = false);
                if let Some((fut, waker)) = tasks[task].as_mut()
                    && fut
                        .as_mut()
                        .poll(&mut Context::from_waker(waker))
                        .is_ready()
                {
                    tasks[task] = None;
                }
            }
            if let Err(e) = poll.poll(&mut events, None) {
                assert_eq!(e.kind(), ErrorKind::Interrupted, "{e}");
                continue;
            }
            for event in events.iter() {
                if event.token() != LISTENER {
                    let source = &sources[event.token().0];
                    source.readable.set(true);
                    if let Some(reader) = source.reader.borrow().as_ref() {
                        reader.wake_by_ref();
                    }
                    continue;
                }
                while let Ok((client, _)) = listener.accept() {
                    let pair = super::connect_pair(client, server).map(|mut io| {
                        let token = Token(sources.len());
                        poll.registry()
                            .register(&mut io, token, Interest::READABLE)
                            .unwrap();
                        let source = Rc::new(Source {
                            readable: Cell::new(true),
                            reader: RefCell::new(None),
                        });
                        sources.push(source.clone());
                        Socket { io, source }
                    });
                    let task = tasks.len();
                    let fut: Task = Box::pin(super::relay_task(pair));
                    let waker = Waker::from(std::sync::Arc::new(TaskWaker(task)));
                    tasks.push(Some((fut, waker)));
                    QUEUED.with_borrow_mut(|q| q.push(false));
                    wake_task(task);
                }
            }
        }
    }
}

mod tasks_sync {
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::future::Future;
    use std::io::{ErrorKind, Read};
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    use futures_util::task::AtomicWaker;
    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Token};

    const LISTENER: Token = Token(usize::MAX);
    const WAKE: Token = Token(usize::MAX - 1);
    const READABLE: usize = 1;

    type BoxedFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    struct Executor {
        remote: Mutex<VecDeque<Arc<Task>>>,
        waker: mio::Waker,
    }

    struct Task {
        /// The future and the task's own waker, dropped together when it is done (the waker
        /// holds the task: made once, not per poll).
        future: Mutex<Option<(BoxedFuture, Waker)>>,
        queued: AtomicBool,
        executor: Arc<Executor>,
    }

    thread_local! {
        /// Set on the executor's thread: a wake-up there needs no lock and no system call.
        static ON_EXECUTOR: Cell<bool> = const { Cell::new(false) };
        static LOCAL: RefCell<VecDeque<Arc<Task>>> = const { RefCell::new(VecDeque::new()) };
    }

    fn schedule(task: Arc<Task>) {
        if task.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if ON_EXECUTOR.get() {
            LOCAL.with_borrow_mut(|q| q.push_back(task));
        } else {
            let executor = Arc::clone(&task.executor);
            executor.remote.lock().unwrap().push_back(task);
            executor.waker.wake().unwrap();
        }
    }

    impl std::task::Wake for Task {
        fn wake(self: Arc<Self>) {
            schedule(self);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            schedule(Arc::clone(self));
        }
    }

    /// A socket's readiness (`READABLE` and, above it, the tick of the event that set it)
    /// and the task waiting to read it.
    struct Source {
        readiness: AtomicUsize,
        reader: AtomicWaker,
    }

    impl Source {
        /// Clears readability if no event came since `seen` was read.
        fn clear(&self, seen: usize) {
            let _ = self.readiness.compare_exchange(
                seen,
                seen & !READABLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    type Socket = super::Socket<Arc<Source>>;

    impl super::TaskSocket for Socket {
        #[inline(always)]
        fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<usize> {
            loop {
                let seen = self.source.readiness.load(Ordering::Acquire);
                if seen & READABLE != 0 {
                    match self.io.read(buf) {
                        Ok(n) => {
                            if n < buf.len() {
                                self.source.clear(seen);
                            }
                            return Poll::Ready(n);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => self.source.clear(seen),
                        Err(_) => return Poll::Ready(0),
                    }
                }
                self.source.reader.register(cx.waker());
                // An event between the load and the registration woke nobody: look again.
                if self.source.readiness.load(Ordering::Acquire) & READABLE == 0 {
                    return Poll::Pending;
                }
            }
        }
    }

    pub fn run(listen: SocketAddr, server: SocketAddr) {
        let mut poll = mio::Poll::new().unwrap();
        let executor = Arc::new(Executor {
            remote: Mutex::new(VecDeque::new()),
            waker: mio::Waker::new(poll.registry(), WAKE).unwrap(),
        });
        ON_EXECUTOR.set(true);
        let mut listener = TcpListener::bind(listen).unwrap();
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .unwrap();
        let mut sources: Vec<Arc<Source>> = Vec::new();
        let mut events = Events::with_capacity(256);
        loop {
            loop {
                let next = LOCAL
                    .with_borrow_mut(|q| q.pop_front())
                    .or_else(|| executor.remote.lock().unwrap().pop_front());
                let Some(task) = next else { break };
                task.queued.store(false, Ordering::Release);
                let mut slot = task.future.lock().unwrap();
                if let Some((fut, waker)) = slot.as_mut()
                    && fut
                        .as_mut()
                        .poll(&mut Context::from_waker(waker))
                        .is_ready()
                {
                    *slot = None;
                }
            }
            if let Err(e) = poll.poll(&mut events, None) {
                assert_eq!(e.kind(), ErrorKind::Interrupted, "{e}");
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    WAKE => {}
                    LISTENER => {
                        while let Ok((client, _)) = listener.accept() {
                            spawn(&executor, &poll, &mut sources, client, server);
                        }
                    }
                    token => {
                        let source = &sources[token.0];
                        // A new tick (the count above the flag) with the flag set.
                        let _ = source.readiness.fetch_update(
                            Ordering::AcqRel,
                            Ordering::Acquire,
                            |r| Some((r & !READABLE).wrapping_add(2) | READABLE),
                        );
                        source.reader.wake();
                    }
                }
            }
        }
    }

    fn spawn(
        executor: &Arc<Executor>,
        poll: &mio::Poll,
        sources: &mut Vec<Arc<Source>>,
        client: TcpStream,
        server: SocketAddr,
    ) {
        let pair = super::connect_pair(client, server).map(|mut io| {
            let token = Token(sources.len());
            poll.registry()
                .register(&mut io, token, Interest::READABLE)
                .unwrap();
            let source = Arc::new(Source {
                readiness: AtomicUsize::new(READABLE),
                reader: AtomicWaker::new(),
            });
            sources.push(Arc::clone(&source));
            Socket { io, source }
        });
        let fut: BoxedFuture = Box::pin(super::relay_task(pair));
        let task = Arc::new(Task {
            future: Mutex::new(None),
            queued: AtomicBool::new(false),
            executor: Arc::clone(executor),
        });
        let waker = Waker::from(Arc::clone(&task));
        *task.future.lock().unwrap() = Some((fut, waker));
        schedule(task);
    }
}
