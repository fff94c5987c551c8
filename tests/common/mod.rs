//! Test harness: one pair of real PostgreSQL clusters per test binary (started by
//! `pgtenant::localpg`), a fresh sample world (databases named per test) and a pgtenant
//! instance per test, plus clients: tokio-postgres, a raw protocol client and psql.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod raw;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgtenant::app::{self, Running};
use pgtenant::demo::{self, Fixture, SampleTenant};
use pgtenant::localpg::Cluster;

/// The two clusters every test in a binary shares.
pub struct World {
    pub a: Cluster,
    pub b: Cluster,
}

static WORLD: OnceLock<World> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// New clusters are copies of one made once for the whole suite, kept in cargo's directory
/// for test files (not the system's temporary directory).
pub fn use_cluster_template() {
    pgtenant::localpg::use_template_dir(Path::new(env!("CARGO_TARGET_TMPDIR")));
}

/// Starts the clusters on first use.
pub fn world() -> &'static World {
    WORLD.get_or_init(|| {
        use_cluster_template();
        let a = Cluster::start(&[]).expect("start cluster A");
        let b = Cluster::start(&[]).expect("start cluster B");
        demo::create_roles(&a, &b).expect("create roles");
        World { a, b }
    })
}

/// A directory of the test's own in the temporary directory, removed when it is dropped
/// (also when the test fails: drops run while a panic unwinds).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// A new empty directory named after `name`, this process and a counter.
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "pgtenant-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pgtenant instance over a fresh copy of the sample world.
pub struct Env {
    pub fixture: Fixture,
    pub proxy: Running,
    /// Files of this environment (a configuration file for reloads), removed with it.
    pub dir: Option<TempDir>,
}

impl Env {
    pub fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    pub fn port(&self) -> u16 {
        self.proxy.addr.port()
    }

    pub fn tenant(&self, name: &str) -> &SampleTenant {
        self.fixture.tenant(name).expect("sample tenant")
    }

    /// A tokio-postgres config for `tenant`, logging in as `user.tenant`.
    pub fn pg_config(&self, tenant: &str) -> tokio_postgres::Config {
        let t = self.tenant(tenant);
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port())
            .user(format!("{}@{}", t.user, t.name))
            .password(t.password.clone())
            .dbname(t.name)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// Connects as `tenant` over plain TCP.
    pub async fn connect(&self, tenant: &str) -> tokio_postgres::Client {
        connect_with(self.pg_config(tenant)).await.expect("connect")
    }

    /// A libpq URL for `tenant`.
    pub fn url(&self, tenant: &str) -> String {
        demo::tenant_url(self.tenant(tenant), self.port())
    }

    /// Superuser SQL on cluster A's shared database.
    pub fn admin_a(&self, sql: &str) -> String {
        world()
            .a
            .psql(&self.fixture.shared_db, sql)
            .expect("admin sql")
    }
}

/// Connects with `config` and drives the connection in the background.
pub async fn connect_with(
    config: tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Like [`connect_with`], keeping the connection task's result: the error that ended it
/// (for example the FATAL error a server sends to an idle session as it ends it).
pub async fn connect_watched(
    config: tokio_postgres::Config,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    (client, tokio::spawn(connection))
}

/// A fresh sample world and a proxy for it; `extra` is appended to the configuration (and
/// `edit` may rewrite the whole text first).
pub async fn start_with(extra: &str, edit: impl FnOnce(String) -> String) -> Env {
    start_tweaked(extra, edit, |_| {}).await
}

/// Like [`start_with`], and `tweak` may change the snapshot before the proxy starts (test-only
/// switches such as running without the guard).
pub async fn start_tweaked(
    extra: &str,
    edit: impl FnOnce(String) -> String,
    tweak: impl FnOnce(&mut pgtenant::config::Snapshot),
) -> Env {
    // PGTENANT_TEST_LOG=debug shows the proxy's logs while debugging a test.
    if let Ok(filter) = std::env::var("PGTENANT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let fixture = fresh_fixture().await;
    let text = edit(fixture.config("127.0.0.1:0", extra));
    let mut snapshot = pgtenant::config::load_str(&text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
    tweak(&mut snapshot);
    let proxy = start_proxy(snapshot).await.expect("start proxy");
    Env {
        fixture,
        proxy,
        dir: None,
    }
}

/// Starts a proxy as the binary runs it: on pgtenant's own runtime (sockets only, its timers
/// on a thread of their own: `pgtenant::timers`), one runtime of two threads per test binary,
/// shared by its tests. Dropping the `Running` stops that proxy.
pub async fn start_proxy(snapshot: pgtenant::config::Snapshot) -> anyhow::Result<Running> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime =
        RUNTIME.get_or_init(|| pgtenant::timers::proxy_runtime(2).expect("the proxy runtime"));
    runtime
        .spawn(app::start(snapshot))
        .await
        .expect("app::start panicked")
}

/// A fresh copy of the sample world (databases named for this test).
pub async fn fresh_fixture() -> Fixture {
    let w = world();
    let suffix = format!("_t{}", NEXT.fetch_add(1, Ordering::Relaxed));
    tokio::task::spawn_blocking(move || demo::create_fixture(&w.a, &w.b, &suffix).expect("fixture"))
        .await
        .unwrap()
}

/// Like [`start_with`], with the configuration in a file of its own (for reloads): the
/// environment and the file's path.
pub async fn start_from_file(extra: &str) -> (Env, std::path::PathBuf) {
    let fixture = fresh_fixture().await;
    let dir = TempDir::new("test-config");
    let path = dir.join("pgtenant.toml");
    std::fs::write(&path, fixture.config("127.0.0.1:0", extra)).unwrap();
    let snapshot = pgtenant::config::load(&path).expect("test config");
    let proxy = start_proxy(snapshot).await.expect("start proxy");
    (
        Env {
            fixture,
            proxy,
            dir: Some(dir),
        },
        path,
    )
}

/// A fresh sample world and a proxy with the default configuration.
pub async fn start() -> Env {
    start_with("", |t| t).await
}

/// The SQLSTATE of a tokio-postgres error.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// Runs psql (blocking) with `url` and `sql`; returns (success, stdout, stderr).
pub fn psql(url: &str, sql: &str) -> (bool, String, String) {
    let out = std::process::Command::new(world().a.binary("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the superuser sees in the shared table: every tenant's rows.
pub fn all_rows(env: &Env) -> String {
    env.admin_a("SELECT tenant_id, name FROM items ORDER BY id")
}

/// Runs `sql` as a simple query and returns its SQLSTATE if it failed.
pub async fn sqlstate_of(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    client.simple_query(sql).await.err().map(|e| code(&e))
}

/// After an attack: no tenant's rows changed, the attacker still sees only its own rows under
/// its own context, and pgtenant still serves everyone.
pub async fn assert_isolation_intact(env: &Env, before: &str, attacker: &tokio_postgres::Client) {
    assert_eq!(all_rows(env), before, "rows changed");
    let row = attacker
        .query_one(
            "SELECT current_setting('app.current_tenant_id'), \
                    (SELECT count(*) FROM items WHERE tenant_id <> current_setting('app.current_tenant_id')::uuid)",
            &[],
        )
        .await
        .expect("the attacker's session still works");
    assert_eq!(row.get::<_, String>(0), pgtenant::demo::ACME_ID);
    assert_eq!(row.get::<_, i64>(1), 0, "another tenant's rows are visible");
    let globex = env.connect("globex").await;
    let names: Vec<String> = globex
        .query("SELECT name FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        names,
        ["globex doomsday device"],
        "pgtenant serves other tenants"
    );
}

/// Every statement in `attacks` fails with 42501 for `client`.
pub async fn assert_all_refused(client: &tokio_postgres::Client, attacks: &[&str]) {
    for sql in attacks {
        assert_eq!(
            sqlstate_of(client, sql).await.as_deref(),
            Some("42501"),
            "not refused: {sql}"
        );
    }
}

/// The message of a tokio-postgres error (the server's or pgtenant's text).
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// A second shared shard: a database on cluster A with the same table, policy and verified
/// context (its own key), and no rows. Returns its `[shards.shared-b]` table.
pub fn second_shared_shard(db: &str, key_file: &std::path::Path) -> String {
    let a = &world().a;
    demo::create_shared_database(a, db, key_file).unwrap();
    let (app, reader) = (demo::APP_ROLE, demo::READONLY_ROLE);
    format!(
        "\n[shards.shared-b]\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"{db}\"\nuser = \"{app}\"\n\
         password = \"{pw}\"\nmax_connections = 20\ntls = \"disable\"\ncontext_key_file = \"{}\"\n\
         readonly_user = \"{reader}\"\nreadonly_password = \"{pw}\"\n",
        a.port,
        key_file.display(),
        pw = a.password,
    )
}

/// Configuration `text` without the `[[tenants]]` entry of tenant `name`.
pub fn without_tenant(text: &str, name: &str) -> String {
    text.split("[[tenants]]\n")
        .enumerate()
        .filter(|(_, chunk)| !chunk.contains(&format!("name = \"{name}\"")))
        .map(|(i, chunk)| {
            if i == 0 {
                chunk.to_owned()
            } else {
                format!("[[tenants]]\n{chunk}")
            }
        })
        .collect()
}

/// The first column of the first row of a simple query's result.
pub fn first_value(messages: &[tokio_postgres::SimpleQueryMessage]) -> String {
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

/// Waits until `check` holds, for at most `patience` (a failure-only limit); how long it took.
pub async fn until(what: &str, patience: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = std::time::Instant::now();
    while !check() {
        assert!(
            started.elapsed() < patience,
            "{what}: not within {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// This process's resident memory (KiB).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
