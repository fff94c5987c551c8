//! What the load examples share: the demo world on throwaway clusters with the release
//! binary in front of it, a raw SCRAM login that keeps the client's own cost minimal, and
//! pgtenant's RSS.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgtenant::demo;
use pgtenant::localpg::Cluster;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Kills the proxy when dropped.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The release binary (`PGTENANT_BIN` overrides it).
pub fn release_binary() -> PathBuf {
    let binary = std::env::var("PGTENANT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/pgtenant")
        });
    assert!(
        binary.is_file(),
        "build the release binary first: cargo build --release"
    );
    binary
}

/// The demo world behind the release binary of pgtenant.
pub struct World {
    pub a: Cluster,
    pub b: Cluster,
    pub fixture: demo::Fixture,
    pub port: u16,
    pub proxy: Reaper,
    pub pid: u32,
    pub dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the clusters (A with `max_connections`), the sample world and pgtenant, whose
/// configuration `edit` may change.
pub async fn start(
    name: &str,
    max_connections: &'static str,
    edit: impl FnOnce(String) -> String,
) -> World {
    let binary = release_binary();
    eprintln!("starting PostgreSQL...");
    let (a, b) = tokio::task::spawn_blocking(move || {
        (
            Cluster::start(&[("max_connections", max_connections)]).unwrap(),
            Cluster::start(&[]).unwrap(),
        )
    })
    .await
    .unwrap();
    let fixture = tokio::task::block_in_place(|| {
        demo::create_roles(&a, &b).unwrap();
        demo::create_fixture(&a, &b, "").unwrap()
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("pgtenant-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pgtenant.toml");
    std::fs::write(
        &config,
        edit(fixture.config(&format!("127.0.0.1:{port}"), "")),
    )
    .unwrap();
    let proxy = Reaper(
        Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("start pgtenant"),
    );
    let pid = proxy.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pgtenant did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    World {
        a,
        b,
        fixture,
        port,
        proxy,
        pid,
        dir,
    }
}

pub async fn connect_from(source: &str, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))?;
    socket.connect(([127, 0, 0, 1], port).into()).await
}

/// Authenticates a raw protocol connection as `user` (SCRAM) and reads to ReadyForQuery.
pub async fn raw_login(port: u16, user: &str, password: &str) -> TcpStream {
    raw_login_from("127.0.0.1", port, user, password).await
}

pub async fn raw_login_from(source: &str, port: u16, user: &str, password: &str) -> TcpStream {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut s = connect_from(source, port).await.unwrap();
    let mut out = BytesMut::new();
    frontend::startup_message([("user", user)], &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, body) = read_msg(&mut s).await.expect("login reply");
        match tag {
            b'R' => {
                let code = i32::from_be_bytes(body[..4].try_into().unwrap());
                let mut out = BytesMut::new();
                match code {
                    10 => {
                        let c =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response("SCRAM-SHA-256", c.message(), &mut out)
                            .unwrap();
                        scram = Some(c);
                    }
                    11 => {
                        let c = scram.as_mut().unwrap();
                        c.update(&body[4..]).unwrap();
                        frontend::sasl_response(c.message(), &mut out).unwrap();
                    }
                    _ => {}
                }
                if !out.is_empty() {
                    s.write_all(&out).await.unwrap();
                }
            }
            b'Z' => return s,
            b'E' => panic!("login failed"),
            _ => {}
        }
    }
}

pub async fn read_msg(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

pub const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How PgBouncer is set up for a comparison: every database name a client asks for goes to
/// `dbname` on the cluster, and the client user `app` logs in with SCRAM against `secret` (its
/// `auth_file` entry: a password or a SCRAM verifier). PgBouncer logs in to the server as
/// `server_login` (user, password), or, when it is `None`, as `app` with the client's SCRAM
/// keys (the role must then have the same verifier on the server).
pub struct Bouncer<'a> {
    pub dbname: &'a str,
    pub secret: &'a str,
    pub server_login: Option<(&'a str, &'a str)>,
    pub pool_mode: &'a str,
    pub pool_size: usize,
    pub max_clients: usize,
}

/// Starts PgBouncer (as the `postgres` OS user when root: it refuses to run as root) in front
/// of `cluster`; its port. The child is killed when the `Reaper` is dropped.
pub fn start_pgbouncer(dir: &std::path::Path, cluster: &Cluster, b: Bouncer<'_>) -> (Reaper, u16) {
    let port = free_port();
    let bdir = dir.join("pgbouncer");
    std::fs::create_dir_all(&bdir).unwrap();
    std::fs::write(
        bdir.join("userlist.txt"),
        format!("\"app\" \"{}\"\n", b.secret),
    )
    .unwrap();
    let login = b
        .server_login
        .map(|(user, password)| format!(" user={user} password={password}"))
        .unwrap_or_default();
    std::fs::write(
        bdir.join("pgbouncer.ini"),
        format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port} dbname={dbname}{login}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {auth}\npool_mode = {pool_mode}\n\
             max_client_conn = {max_clients}\ndefault_pool_size = {pool_size}\nlogfile = {log}\n",
            pg_port = cluster.port,
            dbname = b.dbname,
            auth = bdir.join("userlist.txt").display(),
            pool_mode = b.pool_mode,
            max_clients = b.max_clients,
            pool_size = b.pool_size,
            log = bdir.join("pgbouncer.log").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(PGBOUNCER);
    cmd.arg(bdir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let id = |flag: &str, user: Option<&str>| -> Option<u32> {
        let out = Command::new("id").arg(flag).args(user).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u", None) == Some(0) {
        use std::os::unix::process::CommandExt;
        let _ = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(dir)
            .status();
        cmd.uid(id("-u", Some("postgres")).unwrap())
            .gid(id("-g", Some("postgres")).unwrap());
    }
    let child = cmd.spawn().expect("start pgbouncer");
    wait_for_port(port);
    (Reaper(child), port)
}

/// User and system CPU of process `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    (
        fields[11].parse::<u64>().unwrap(),
        fields[12].parse::<u64>().unwrap(),
    )
}

/// The machine's CPU ticks since boot: (busy, idle), all cores, from /proc/stat's first line
/// (idle counts `idle` and `iowait`).
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .expect("a cpu line")
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().expect("a tick count"))
        .collect();
    let idle = fields[3] + fields[4];
    (fields.iter().sum::<u64>() - idle, idle)
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
