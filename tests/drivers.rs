//! Real drivers through pgtenant in transaction mode, 50 clients over 5 server connections:
//! psycopg 3, asyncpg, node-postgres and pgjdbc, each running its named/prepared-statement
//! path (see `tests/drivers/README.md`). `scripts/test.sh` installs the drivers; a machine
//! without them fails here with the command that installs them, unless
//! `PGTENANT_SKIP_DRIVERS=1` says to skip on purpose.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, all_rows, start_with};

const CLIENTS: usize = 50;
const SERVER_CONNECTIONS: usize = 5;
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Transaction pooling with five server connections on the shared shard. Clients wait up to
/// 60 s for one: a slow machine makes the run slower, never a failure.
async fn env() -> Env {
    start_with("", |t| {
        t.replacen(
            "max_connections = 60",
            &format!("max_connections = {SERVER_CONNECTIONS}"),
            1,
        )
        .replacen(
            "mode = \"transaction\"",
            "mode = \"transaction\"\ncheckout_timeout = \"60s\"",
            1,
        )
    })
    .await
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// `PGT_TENANTS` for the two shared tenants (rows: what `items` shows each).
fn tenants_spec(env: &Env) -> String {
    [("acme", 2), ("globex", 1)]
        .iter()
        .map(|(name, rows)| {
            let t = env.tenant(name);
            format!(
                "{}|{}.{}|{}|{}|{}|{rows}",
                t.name, t.user, t.name, t.password, t.name, t.id
            )
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Whether a driver's runtime is present; when it is not, fail with how to install it (or
/// skip when PGTENANT_SKIP_DRIVERS=1).
fn available(name: &str, probe: &mut Command, install: &str) -> bool {
    let ok = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("PGTENANT_SKIP_DRIVERS").as_deref() == Ok("1") {
        eprintln!("skipping {name}: not installed and PGTENANT_SKIP_DRIVERS=1");
        return false;
    }
    panic!("{name} is not installed; run scripts/test.sh (it runs: {install})");
}

/// Runs a driver check program against `env`, bounded in time, and returns the number of
/// distinct server backends it saw.
async fn run(env: &Env, mut cmd: Command) -> usize {
    cmd.current_dir(drivers_dir())
        .env("PGT_PORT", env.port().to_string())
        .env("PGT_CLIENTS", CLIENTS.to_string())
        .env("PGT_TENANTS", tenants_spec(env))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut child = cmd.spawn().expect("start the driver check");
        loop {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            if started.elapsed() > Duration::from_secs(180) {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("driver output")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    let pids: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pids="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pids= line in:\n{stdout}"));
    assert!(
        pids <= SERVER_CONNECTIONS,
        "{CLIENTS} clients used {pids} server connections"
    );
    pids
}

/// Runs a check and asserts that no tenant's rows changed.
async fn check(cmd: Command) {
    let env = env().await;
    let before = all_rows(&env);
    let pids = run(&env, cmd).await;
    assert!(pids >= 1);
    assert_eq!(all_rows(&env), before);
}

fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(script);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepared_statements_and_pipelines() {
    if available(
        "psycopg 3",
        Command::new("python3").args(["-c", "import psycopg"]),
        "pip install 'psycopg[binary]'",
    ) {
        check(python("psycopg_check.py")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_statement_cache_and_listeners() {
    if available(
        "asyncpg",
        Command::new("python3").args(["-c", "import asyncpg"]),
        "pip install asyncpg",
    ) {
        check(python("asyncpg_check.py")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries() {
    let dir = drivers_dir().join("node");
    if available(
        "node-postgres",
        Command::new("node")
            .current_dir(&dir)
            .args(["-e", "require('pg')"]),
        "npm ci --prefix tests/drivers/node",
    ) {
        let mut c = Command::new("node");
        c.arg("node/check.js");
        check(c).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_server_prepared_statements() {
    if available(
        "pgjdbc",
        Command::new("test").args(["-f", JDBC_JAR]),
        "apt-get install libpostgresql-jdbc-java",
    ) && available(
        "java",
        Command::new("java").arg("-version"),
        "apt-get install default-jdk-headless",
    ) {
        let mut c = Command::new("java");
        c.args(["-cp", JDBC_JAR, "JdbcCheck.java"]);
        check(c).await;
    }
}
